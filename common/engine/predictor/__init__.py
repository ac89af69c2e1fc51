"""WISP's rejection predictor: training data (`pairs`), the models and their training
(`model`), the offline cost of a stopping rule (`cost`), data collection against the target
(`collect`), the train-and-choose pipeline (`train`) and the ONNX runtime the edge runs
(`runtime`). No transport here: the predictor service and the edge-drafter wire it to NATS."""

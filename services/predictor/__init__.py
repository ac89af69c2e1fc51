"""predictor: learns the rejection predictor from live verdicts, retrains it, and ships
accepted models to the edges through the JetStream object store."""

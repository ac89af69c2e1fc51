"""python -m services.predictor [--flags]  (every flag also as WISP_* env var; see --help)"""

from __future__ import annotations

import asyncio

from common.config import load_config
from common.logs import configure_logging
from common.transport.service import run_service
from services.predictor.service import PredictorConfig, PredictorService


def main(argv: list[str] | None = None) -> None:
    config = load_config(PredictorConfig, argv, prog="python -m services.predictor")
    configure_logging(config.log_level)
    if config.train_threads:
        import torch

        # Process-wide, so set here rather than by the service (tests run it in their own
        # process). The MLP is tiny: more threads than one only spin against each other and
        # against the event loop, which is slower on a busy machine, never faster.
        torch.set_num_threads(config.train_threads)
    asyncio.run(run_service(PredictorService(config), config))


if __name__ == "__main__":
    main()

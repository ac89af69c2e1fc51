"""`python -m services.gpu_verifier`: config and transport wiring only."""

from __future__ import annotations

import asyncio

from common.config import load_config
from common.logs import configure_logging
from common.transport.service import prefer_loop_latency, run_service
from services.gpu_verifier.service import VerifierConfig, VerifierService


def main(argv: list[str] | None = None) -> None:
    config = load_config(VerifierConfig, argv, prog="python -m services.gpu_verifier")
    configure_logging(config.log_level)
    prefer_loop_latency()
    asyncio.run(run_service(VerifierService(config), config))


if __name__ == "__main__":
    main()

"""python -m services.metrics — config and transport wiring only."""

from __future__ import annotations

import asyncio

from common.config import load_config
from common.logs import configure_logging
from common.transport.service import run_service
from services.metrics.service import MetricsConfig, MetricsService


def main(argv: list[str] | None = None) -> None:
    config = load_config(MetricsConfig, argv, prog="python -m services.metrics")
    configure_logging(config.log_level)
    asyncio.run(run_service(MetricsService(config), config))


if __name__ == "__main__":
    main()

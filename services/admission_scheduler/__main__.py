"""`python -m services.admission_scheduler`: config from flags / WISP_* env, then run."""

from __future__ import annotations

import asyncio

from common.config import load_config
from common.logs import configure_logging
from common.transport.service import run_service
from services.admission_scheduler.service import SchedulerConfig, SchedulerService


def main(argv: list[str] | None = None) -> None:
    config = load_config(SchedulerConfig, argv, prog="python -m services.admission_scheduler")
    configure_logging(config.log_level)
    asyncio.run(run_service(SchedulerService(config), config))


if __name__ == "__main__":
    main()

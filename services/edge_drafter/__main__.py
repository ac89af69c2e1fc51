"""python -m services.edge_drafter [--flags]  (every flag also as WISP_* env var; see --help)"""

import asyncio

from common.config import load_config
from common.logs import configure_logging
from common.transport.service import prefer_loop_latency, run_service
from services.edge_drafter.service import EdgeConfig, EdgeDrafterService


def main() -> None:
    config = load_config(EdgeConfig, prog="python -m services.edge_drafter")
    configure_logging(config.log_level)
    prefer_loop_latency()
    asyncio.run(run_service(EdgeDrafterService(config), config))


if __name__ == "__main__":
    main()

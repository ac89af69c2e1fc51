"""metrics: aggregates wisp.events.* into Prometheus metrics, /summary and a dashboard."""

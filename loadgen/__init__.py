"""Load generator: replay a workload (an Azure LLM inference trace, JSON lines, or a synthetic
arrival process) through the client SDK against a running stack and report the metrics of
../shared/DESIGN.md §7 (TTFT, TPOT, SLO attainment, goodput, capacity).

`loadgen.workload` says which requests arrive when and how long they are;
`loadgen.prompts` makes their prompts from the held-out corpus.
"""

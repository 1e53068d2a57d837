"""Measurement over the runtime: end-to-end latency, memory and quality of dense vs pruned pipelines, and the
reports (JSON, Markdown, plots) they write. Above runtime (it runs what runtime builds), below pipeline (``make
engine`` measures through it) and benchmarks (thin command lines over it)."""

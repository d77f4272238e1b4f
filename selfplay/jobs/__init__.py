"""One-shot commands that prepare or use a run directory: `sft` (pretrain the policy), `critic` (train the initial
critic), `generate` (essays as JSON lines), `bench` (throughput benchmarks)."""

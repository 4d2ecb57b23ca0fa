"""The layerwise prefill engine: a compact Llama, the prefill loop, KV sources (recompute, DRAM, object tier)
behind one load protocol, the reader process, the GPU profiler and the vLLM connector."""

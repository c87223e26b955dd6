"""Decode-time KV-cache eviction for vLLM 0.32-0.33 (V1 engine, CPU runner).

Serve with::

    VLLM_USE_V2_MODEL_RUNNER=0 vllm serve MODEL \\
        --scheduler-cls vllm_tokenzip.kv.scheduler.EvictingScheduler \\
        --worker-cls vllm_tokenzip.kv.worker.EvictingCPUWorker

and opt a request in with ``vllm_xargs: {"tokenzip_kv_budget": N, "tokenzip_kv_policy":
"streamingllm" | "snapkv" | "h2o"}`` (server defaults: env ``TOKENZIP_KV_BUDGET``,
``TOKENZIP_KV_POLICY``). Modules:

* :mod:`.policies` - the scoring policies (pure torch) and their shared selection;
* :mod:`.compaction` - gathering and compacting one request's entries in a paged cache;
* :mod:`.request` - per-request settings;
* :mod:`.scheduler` - compaction plans, block freeing, physical-token accounting;
* :mod:`.worker` - physical ``seq_lens``/slot mapping and the compaction itself;
* :mod:`.capture` - the attention wrapper that observes queries and attention mass;
* :mod:`.reference` - the same eviction on Hugging Face transformers, for comparisons.
"""

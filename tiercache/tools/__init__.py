"""Tools that exercise the runtime, kept apart from it: nothing in the runtime imports them.

    demo       tiercache demo: a long-context RAG run without and with the cache (transformers)
    bench      tiercache bench: every tier against its bound, peers, core cost per block
    plan       tiercache plan: tier sizing from a model config, trace replay through the policies
    workload   the seeded RAG workload generator the demo, bench and plan share
    tokenizer  a small tokenizer trained locally for the built-in demo model
"""

"""Planning a configuration for target chips before paying for them: `sktlm plan`. planner.plan assembles the
report from targets (what to plan for), counters (bytes, jaxpr FLOPs, all-to-all), aot (compile, the compiler's
refusal, batch search) and report (the text).
"""

"""The pipeline service's own parts, between BentoML (`service.py`) and the ML (`pipeline/`).

    settings     PIPELINE_* environment variables, validated once at start-up
    files        the gateway file roots that inputs and outputs must lie in
    runner       picks the model and pipeline kind for a job; every failure becomes an outcome
    recent_jobs  what was already reported, so a repeat is not run twice
"""

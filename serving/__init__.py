"""The pipeline service's own parts, between BentoML (`service.py`) and the ML (`pipeline/`).

    settings       PIPELINE_* environment variables, validated once at start-up
    files          the gateway file roots; inputs and outputs opened once, inside them
    task_pipeline  the task's pipeline, asked of AiCSD's task launcher, picks the model
    jobs           one job from request to AiCSD's answers, through the ledger
    answers        the status and body answered for a job, alone (/classify) or in a batch,
                   and a batch's jobs answered in lanes
    ledger         the durable job ledger: a job that comes again is never run or reported twice
    runner         the model and pipeline kind for a job; every failure becomes an outcome
    model_watch    models picked up, replaced and withdrawn while the service runs
    bundle         the models a bento must carry, checked at `bentoml build`
"""

"""The AiCSD wire contract and nothing else (see AICSD_CONTRACT.md).

    job             the job message, validated at the edge (`JobRequest` -> `Job`)
    callback_rules  AiCSD's callback URL shapes and the allowed callback hosts
    outcome         what a job produced (`PipelineOutcome`, `OutputFile`)
    callbacks       the job update, then the status, with retries (`AicsdClient`)
    transport       the kept-alive HTTP client the callbacks and the bridge use
    errors          the failure families, each with a message fit for the AiCSD UI
    logs            logging set-up, the job logger (`JobLog`), job text made safe (`shown`)
    settings        declared settings (`DeclaredSettings`), every problem reported at once

It imports neither numpy nor OpenVINO, so the MQTT bridge ships it whole.
"""

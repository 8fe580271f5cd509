"""The ML pipelines: image I/O, the model repository, one module per pipeline kind.

    images            reading input images (JPEG, PNG, TIFF, ...) within a pixel budget
    memory            the memory budget for images in flight
    model_repository  OVMS-layout model folders, each version compiled once
    base              what a pipeline kind implements (`Pipeline`, `PipelineTask`)
    classification    our image classifier (EfficientNet-Lite0)
    counting          our blob counter
    model_api         Geti / Model API exports served through openvino-model-api
    model_api_kinds   what each Model API family means for AiCSD: parameters, Results, QC flags
    parameters        declared ModelParams schemas, every bad key reported at once
    annotate          pictures of what a pipeline found (boxes, masks, points)
    output_files      writing output files complete and without overwriting
"""

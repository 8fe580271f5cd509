"""The ML pipelines: image I/O, the model repository, one module per pipeline kind.

    images            reading input images (JPEG, PNG, TIFF, ...) within a pixel budget
    model_repository  OVMS-layout model folders, each version compiled once
    base              what a pipeline kind implements (`Pipeline`, `PipelineTask`)
    classification    the image classifier
    counting          our blob counter
    output_files      writing output files complete and without overwriting
"""

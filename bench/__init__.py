"""`make bench`: the whole chain measured against OpenVINO's own limit (benchmark_app)."""

"""The benchmark's profile buckets: py-spy's collapsed stacks sorted into the parts of a job."""

from __future__ import annotations

from bench.profile import HTTP_BUCKET, bucket_samples

RAW = "\n".join([
    "run (threading.py:1);classify (service.py:120);_send (helper.py:180);exchange (http_client.py:90) 30",
    "run (threading.py:1);classify (service.py:120);run (runner.py:50);load_rgb (images.py:232);decode (x.py:1) 20",
    "run (threading.py:1);classify (service.py:120);run (runner.py:50);infer (model_repository.py:139) 25",
    "main (service.py:1);send (httptools_impl.py:400) 25",
    "not a sample line",
]).replace("classify (", "AicsdPipeline.classify (").replace("_send (", "AicsdClient._send (") \
  .replace("run (runner", "PipelineRunner.run (runner").replace("infer (model", "CompiledModel.infer (model")


def test_samples_go_to_the_most_specific_part_of_the_job_and_the_rest_is_http_handling():
    profile = bucket_samples(RAW)
    assert profile.samples == 100 and profile.error is None
    assert profile.buckets["AiCSD callbacks (helper.AicsdClient)"] == 30.0
    assert profile.buckets["pipeline: image decode and resize"] == 20.0
    assert profile.buckets["pipeline: inference (OpenVINO call)"] == 25.0
    assert profile.buckets["service.py and job parsing"] == 0.0
    assert profile.buckets[HTTP_BUCKET] == 25.0
    assert profile.top_self[0] == ("exchange (http_client.py)", 30.0)


def test_no_samples_is_reported_as_an_error_not_as_empty_shares():
    profile = bucket_samples("")
    assert profile.samples == 0 and profile.error == "py-spy recorded no samples"
    assert profile.text() == "profile unavailable: py-spy recorded no samples"

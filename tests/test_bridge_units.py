"""Bridge pieces on their own: configuration, the spool, and the fate of each payload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config
from bridge.receiver import inspect_payload
from bridge.spool import Arrival, DeadLetter, Done, NewJob, RetryLater, Spool

REPO = Path(__file__).resolve().parent.parent
ALLOWED = frozenset({"127.0.0.1", "job-repository", "task-launcher"})
JOB = {
    "InputFileLocation": "/tmp/files/input/1.tiff",
    "OutputFileFolder": "/tmp/files/output",
    "ModelParams": {"Brightness": "0"},
    "JobUpdateUrl": "http://job-repository:59784/api/v1/job/pipeline/j1/t1",
    "PipelineStatusUrl": "http://task-launcher:59785/api/v1/pipelineStatus/j1/t1",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


GOOD_CONFIG = """
service: {POST_url: "http://localhost", port: "3000", service_func: classify}
gateway_ip: "10.1.2.3"
mqtt: {topic: mqtt-export/pipeline/params, hostname: broker, port: 1883}
"""


class TestConfig:
    def test_reference_keys_make_the_api_url(self, tmp_path):
        config = load_config(write(tmp_path, GOOD_CONFIG), env={})
        assert config.service_url == "http://localhost:3000/classify"
        assert (config.gateway_ip, config.mqtt_hostname, config.mqtt_port) == ("10.1.2.3", "broker", 1883)
        assert (config.qos, config.concurrency, config.client_id) == (1, 2, "aicsd-pipeline-bridge")
        assert config.subscription == "mqtt-export/pipeline/params"

    def test_shipped_config_is_refused_until_the_placeholders_are_replaced(self):
        with pytest.raises(ConfigError) as info:
            load_config(REPO / "pythonClientConfig.yaml", env={})
        assert [p.split(":")[0] for p in info.value.problems] == ["service.POST_url", "gateway_ip"]
        assert "##.##.##.##" in str(info.value)

    def test_shipped_config_works_with_environment_overrides(self, tmp_path):
        env = {
            "BRIDGE_SERVICE_URL": "http://127.0.0.1:3000/classify",
            "BRIDGE_GATEWAY_IP": "192.168.0.20",
            "BRIDGE_MQTT_HOSTNAME": "127.0.0.1",
            "BRIDGE_MQTT_PORT": "1884",
            "BRIDGE_SPOOL": str(tmp_path / "s.db"),
        }
        config = load_config(REPO / "pythonClientConfig.yaml", env=env)
        assert config.service_url == "http://127.0.0.1:3000/classify"
        assert (config.mqtt_hostname, config.mqtt_port, config.spool) == ("127.0.0.1", 1884, tmp_path / "s.db")
        assert config.topic == "mqtt-export/pipeline/params" and config.qos == 1

    def test_shared_group_subscribes_to_the_share_topic(self, tmp_path):
        assert load_config(write(tmp_path, GOOD_CONFIG), env={}).shared_group is None
        text = GOOD_CONFIG.replace("port: 1883}", "port: 1883, shared_group: pipelines}")
        assert load_config(write(tmp_path, text), env={}).subscription == "$share/pipelines/mqtt-export/pipeline/params"

    def test_every_problem_is_listed_at_once(self, tmp_path):
        text = """
service: {POST_url: "ftp//x", port: "30a0"}
gateway_ip: "##.##.##.##"
mqtt: {topic: "a/#", hostname: broker, port: 99999, qos: 3, tls: {ca_certs: /nonexistent/ca.crt}}
bridge: {concurrency: 0, max_age: soon}
"""
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text), env={})
        keys = [p.split(":")[0] for p in info.value.problems]
        assert keys == [
            "service.POST_url", "service.port", "gateway_ip", "mqtt.topic", "mqtt.port", "mqtt.qos",
            "mqtt.tls.ca_certs", "bridge.concurrency", "bridge.max_age",
        ]

    def test_a_bad_environment_override_is_named_with_its_variable(self, tmp_path):
        env = {"BRIDGE_MQTT_PORT": "0", "BRIDGE_LOG_LEVEL": "chatty", "BRIDGE_SERVICE_URL": "localhost:3000"}
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, GOOD_CONFIG), env=env)
        problems = info.value.problems
        assert problems[0].startswith("BRIDGE_SERVICE_URL: must be an http(s) URL")
        assert any(p.startswith("mqtt.port (from BRIDGE_MQTT_PORT):") for p in problems)
        assert any(p.startswith("bridge.log_level (from BRIDGE_LOG_LEVEL):") for p in problems)

    def test_a_misspelt_bridge_key_is_reported_not_ignored(self, tmp_path):
        with pytest.raises(ConfigError, match=r"bridge.concurency: unknown key"):
            load_config(write(tmp_path, GOOD_CONFIG + "bridge: {concurency: 4}\n"), env={})

    def test_log_level_and_status_topic_have_defaults_and_overrides(self, tmp_path):
        config = load_config(write(tmp_path, GOOD_CONFIG), env={})
        assert config.log_level == "INFO"
        assert config.status_topic == "aicsd-pipeline/bridge/aicsd-pipeline-bridge/status"
        text = GOOD_CONFIG + "bridge: {log_level: debug}\n"
        assert load_config(write(tmp_path, text), env={}).log_level == "DEBUG"
        assert load_config(write(tmp_path, text), env={"BRIDGE_LOG_LEVEL": "warning"}).log_level == "WARNING"

    def test_metrics_port_and_address_have_defaults_an_override_and_rules(self, tmp_path):
        config = load_config(write(tmp_path, GOOD_CONFIG), env={})
        assert (config.metrics_address, config.metrics_port) == ("0.0.0.0", 9464)
        assert load_config(write(tmp_path, GOOD_CONFIG), env={"BRIDGE_METRICS_PORT": "0"}).metrics_port == 0
        shipped = load_config(REPO / "pythonClientConfig.yaml", env={"BRIDGE_SERVICE_URL": "http://localhost:3000/classify",
                                                                      "BRIDGE_GATEWAY_IP": "10.0.0.1"})
        assert (shipped.metrics_address, shipped.metrics_port) == ("0.0.0.0", 9464)
        text = GOOD_CONFIG + 'bridge: {concurrency: 0, metrics_port: 70000, metrics_address: "every interface"}\n'
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text), env={})
        keys = [p.split(":")[0] for p in info.value.problems]
        assert keys == ["bridge.concurrency", "bridge.metrics_port", "bridge.metrics_address"]
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, GOOD_CONFIG), env={"BRIDGE_METRICS_PORT": "metrics"})
        assert [p.split(":")[0] for p in info.value.problems] == ["bridge.metrics_port (from BRIDGE_METRICS_PORT)"]

    def test_missing_file_and_bad_yaml_are_reported(self, tmp_path):
        with pytest.raises(ConfigError, match="does not exist"):
            load_config(tmp_path / "nope.yaml", env={})
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(write(tmp_path, "service: [unclosed"), env={})
        with pytest.raises(ConfigError, match="mapping"):
            load_config(write(tmp_path, "- a list"), env={})


class TestSpool:
    def test_a_write_failure_is_shown_until_a_write_succeeds_not_merely_a_transaction(self, tmp_path):
        spool = Spool(tmp_path / "s.db")
        spool.failing = "database or disk is full"  # as a failed store leaves it
        assert spool.take() == [] and spool.next_due() is None  # nothing written: nothing shown to work
        assert spool.failing == "database or disk is full"
        spool.add("j", "t", "{}")
        assert spool.failing is None

    def test_a_job_still_queued_or_in_flight_is_stored_once(self, tmp_path):
        spool = Spool(tmp_path / "s.db")
        assert spool.add("j", "t", "{}") is Arrival.NEW
        assert spool.add("j", "t", "{}") is Arrival.DUPLICATE
        assert spool.add("j", "t2", "{}") is Arrival.NEW
        spool.claim()
        assert spool.add("j", "t", "{}") is Arrival.DUPLICATE
        assert (spool.counts().queued, spool.counts().inflight) == (1, 1)

    def test_messages_stored_together_are_each_new_a_duplicate_taken_again_or_a_dead_letter(self, tmp_path):
        spool = Spool(tmp_path / "s.db")
        spool.add("finished", "t", "{}")
        spool.complete(spool.claim().key)
        arrivals = spool.store([NewJob("a", "t", "{}"), NewJob("a", "t", "{}"), DeadLetter("payload is not JSON", b"{"),
                                NewJob("finished", "t", '{"run": 2}')])
        assert arrivals == [Arrival.NEW, Arrival.DUPLICATE, None, Arrival.AGAIN]
        counts = spool.counts()
        assert (counts.queued, counts.done, counts.dead_letters) == (2, 0, 1)

    def test_a_take_records_the_outcomes_then_claims_the_oldest_due_jobs(self, tmp_path):
        spool = Spool(tmp_path / "s.db", clock=lambda: 0.0)
        for name in ("a", "b", "c", "d"):
            spool.add(name, "t", "{}")
        first, second = spool.take(limit=2)
        taken = spool.take([Done(first.key), RetryLater(second.key, 0, "service answered 503", True)], limit=2)
        assert [(job.job_id, job.attempts, job.service_answered) for job in taken] == [("b", 2, True), ("c", 1, False)]
        counts = spool.counts()
        assert (counts.done, counts.inflight, counts.queued) == (1, 2, 1)

    def test_jobs_are_claimed_in_arrival_order_and_only_once(self, tmp_path):
        clock = iter(range(100)).__next__
        spool = Spool(tmp_path / "s.db", clock=lambda: float(clock()))
        for name in ("a", "b", "c"):
            spool.add(name, "t", "{}")
        claimed = [spool.claim() for _ in range(4)]
        assert [c.job_id if c else None for c in claimed] == ["a", "b", "c", None]
        assert spool.counts().inflight == 3

    def test_job_retried_later_is_not_due_before_its_time(self, tmp_path):
        now = [0.0]
        spool = Spool(tmp_path / "s.db", clock=lambda: now[0])
        spool.add("a", "t", "{}")
        job = spool.claim()
        spool.retry_later(job.key, 5, "service down")
        assert spool.claim() is None and spool.next_due() == 5
        now[0] = 6
        again = spool.claim()
        assert again.job_id == "a" and again.attempts == 2

    def test_in_flight_jobs_survive_a_restart_and_are_queued_again(self, tmp_path):
        spool = Spool(tmp_path / "s.db")
        spool.add("a", "t", '{"x": 1}')
        spool.claim()
        spool.close()
        reopened = Spool(tmp_path / "s.db")
        assert reopened.requeue_inflight() == 1
        assert reopened.claim().payload == '{"x": 1}'

    def test_a_job_published_again_after_it_was_done_or_failed_is_taken_again_afresh(self, tmp_path):
        now = [0.0]
        spool = Spool(tmp_path / "s.db", clock=lambda: now[0])
        spool.add("a", "t", '{"run": 1}')
        spool.complete(spool.claim().key)
        spool.add("b", "t", '{"run": 1}')
        job = spool.claim()
        spool.retry_later(job.key, 0, "service answered 502", service_answered=True)
        spool.fail(spool.claim(), "gave up")
        now[0] = 50.0
        assert spool.add("a", "t", '{"run": 2}') is Arrival.AGAIN
        assert spool.add("b", "t", '{"run": 2}') is Arrival.AGAIN
        again = [spool.claim(), spool.claim()]
        assert [(j.job_id, j.payload, j.received_at, j.attempts, j.service_answered) for j in again] == [
            ("a", '{"run": 2}', 50.0, 1, False), ("b", '{"run": 2}', 50.0, 1, False)]
        assert spool.history(("a", "t")) == [("done", None)]
        assert spool.history(("b", "t")) == [("failed", "gave up")]

    def test_unexpected_errors_are_counted_per_job(self, tmp_path):
        spool = Spool(tmp_path / "s.db")
        spool.add("a", "t", "{}")
        counts = []
        for _ in range(3):
            job = spool.claim()
            counts.append(spool.unexpected_error(job.key))
            assert spool.claim() is None  # still in flight until its outcome is recorded
            spool.retry_later(job.key, 0, "boom")
        assert counts == [1, 2, 3] and spool.claim().unexpected_errors == 3

    def test_a_spool_written_by_an_older_bridge_gets_the_new_columns(self, tmp_path):
        import sqlite3

        db = sqlite3.connect(tmp_path / "old.db")
        db.executescript(
            "CREATE TABLE jobs (job_id TEXT NOT NULL, task_id TEXT NOT NULL, payload TEXT NOT NULL,"
            " received_at REAL NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " next_attempt_at REAL NOT NULL, reject_reason TEXT, last_error TEXT, finished_at REAL,"
            " PRIMARY KEY (job_id, task_id));"
            "INSERT INTO jobs VALUES ('a', 't', '{}', 0, 'queued', 0, 0, NULL, NULL, NULL);"
        )
        db.close()
        job = Spool(tmp_path / "old.db").claim()
        assert (job.job_id, job.unexpected_errors, job.service_answered) == ("a", 0, False)

    def test_a_spool_that_cannot_be_written_is_one_spool_error(self, tmp_path):
        from bridge.spool import SpoolError

        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        target = tmp_path / "ro" / "s.db"
        try:
            import os

            if os.geteuid() == 0:
                # root writes anywhere: a file where the spool's folder should be does the same
                (tmp_path / "file").write_text("")
                target = tmp_path / "file" / "s.db"
            with pytest.raises(SpoolError, match="cannot open the spool"):
                Spool(target)
        finally:
            (tmp_path / "ro").chmod(0o700)

    def test_failed_job_goes_to_the_dead_letter_table_with_its_reason(self, tmp_path):
        spool = Spool(tmp_path / "s.db")
        spool.add("a", "t", "{}")
        spool.fail(spool.claim(), "service refused the job (422)")
        spool.dead_letter("payload is not JSON", b"\xff", topic="x")
        assert spool.dead_letters() == [("a", "t", "service refused the job (422)"), (None, None, "payload is not JSON")]
        counts = spool.counts()
        assert (counts.failed, counts.dead_letters) == (1, 2)

    def test_old_finished_jobs_are_pruned(self, tmp_path):
        now = [0.0]
        spool = Spool(tmp_path / "s.db", clock=lambda: now[0])
        spool.add("a", "t", "{}")
        spool.complete(spool.claim().key)
        now[0] = 100
        assert spool.prune(50) == 1 and spool.add("a", "t", "{}") is Arrival.NEW


class TestMetrics:
    """The collector on its own, with a clock of the test's: what it reads, and a spool it cannot read."""

    def figures(self, tmp_path, now: float) -> tuple[dict[str, float], ...]:
        """What a scrape shows, with a readable spool and then with the spool closed."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        from aicsd.callbacks import AicsdClient
        from bridge.forwarder import Forwarder
        from bridge.metrics import BridgeCollector
        from bridge.receiver import Receiver

        config = load_config(write(tmp_path, GOOD_CONFIG), env={})
        spool = Spool(tmp_path / "spool.db", clock=lambda: 100.0)
        aicsd = AicsdClient()
        forwarder = Forwarder(config, spool, aicsd)
        receiver = Receiver(config, spool, on_jobs=forwarder.notify)
        spool.add("j1", "t1", "{}")
        spool.add("j2", "t2", "{}")
        spool.claim()
        receiver.received, receiver.duplicates, forwarder.forwarded = 3, 1, 2
        registry = CollectorRegistry()
        registry.register(BridgeCollector(spool, receiver, forwarder, config.concurrency, clock=lambda: now))
        try:
            first = generate_latest(registry).decode()
            spool.close()
            second = generate_latest(registry).decode()
        finally:
            aicsd.close()
        return tuple({s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
                     for text in (first, second))

    def test_figures_are_read_at_scrape_time_and_a_spool_it_cannot_read_leaves_its_gauges_out(self, tmp_path):
        readable, closed = self.figures(tmp_path, now=130.0)
        assert readable["aicsd_bridge_queue_depth"] == 1 and readable["aicsd_bridge_in_flight"] == 1
        assert readable["aicsd_bridge_oldest_job_age_seconds"] == 30
        assert (readable["aicsd_bridge_received_total"], readable["aicsd_bridge_duplicates_total"],
                readable["aicsd_bridge_forwarded_total"]) == (3, 1, 2)
        assert readable["aicsd_bridge_broker_connected"] == 0 and readable["aicsd_bridge_spool_ok"] == 1
        assert readable["aicsd_bridge_workers"] == 2 and readable["aicsd_bridge_workers_alive"] == 0
        assert "aicsd_bridge_queue_depth" not in closed and "aicsd_bridge_oldest_job_age_seconds" not in closed
        assert closed["aicsd_bridge_spool_ok"] == 0 and closed["aicsd_bridge_received_total"] == 3


class TestPayloads:
    def test_valid_job_is_spooled_under_its_job_and_task_ids(self):
        receipt = inspect_payload(json.dumps(JOB).encode(), ALLOWED)
        assert receipt.key == ("j1", "t1") and receipt.dead_reason is None and receipt.reject_reason is None

    def test_job_whose_json_escapes_a_lone_surrogate_can_be_stored(self, tmp_path):
        # Valid JSON, and the field is not one the job schema reads: the job is valid. Stored as
        # text UTF-8 cannot encode, it would fail every time and never be acknowledged.
        receipt = inspect_payload(json.dumps({**JOB, "Note": "\ud800"}).encode(), ALLOWED)
        assert receipt.key == ("j1", "t1") and receipt.dead_reason is None and receipt.reject_reason is None
        spool = Spool(tmp_path / "s.db")
        assert spool.add(*receipt.key, receipt.text) is Arrival.NEW
        assert json.loads(spool.claim().payload)["Note"] == "\ud800"

    def test_valid_job_is_spooled_as_the_service_request_body_with_the_bridge_gateway_ip(self):
        # The forwarder posts the spooled text as it is: the JSON is parsed once, on receipt.
        sent = {**JOB, "GatewayIP": "from-aicsd"}
        receipt = inspect_payload(json.dumps(sent).encode(), ALLOWED, "10.1.2.3")
        assert json.loads(receipt.text) == {**JOB, "GatewayIP": "10.1.2.3"}
        assert receipt.text == json.dumps({**JOB, "GatewayIP": "10.1.2.3"}, separators=(",", ":"))

    @pytest.mark.parametrize(
        "payload, reason",
        [
            (b"\xff\xfe", "not UTF-8"),
            (b"{not json", "not JSON"),
            (b"[1, 2]", "JSON list, not an object"),
            (b'"text"', "JSON str, not an object"),
            (json.dumps({**JOB, "JobUpdateUrl": "nonsense"}).encode(), "JobUpdateUrl"),
        ],
    )
    def test_payload_that_cannot_be_reported_is_dead_lettered(self, payload, reason):
        receipt = inspect_payload(payload, ALLOWED)
        assert receipt.key is None and reason in receipt.dead_reason

    def test_job_with_usable_urls_but_a_missing_field_is_spooled_to_be_failed(self):
        job = {k: v for k, v in JOB.items() if k != "InputFileLocation"}
        receipt = inspect_payload(json.dumps(job).encode(), ALLOWED)
        assert receipt.key == ("j1", "t1") and "InputFileLocation" in receipt.reject_reason

    def test_job_whose_callback_host_is_not_allowed_is_dead_lettered(self):
        job = {**JOB, "JobUpdateUrl": JOB["JobUpdateUrl"].replace("job-repository", "elsewhere")}
        receipt = inspect_payload(json.dumps(job).encode(), ALLOWED)
        assert receipt.key is None and "bridge.callback_hosts" in receipt.dead_reason


def test_tls_files_that_are_not_certificates_stop_start_up_with_one_line_and_exit_code_2(tmp_path):
    import subprocess
    import sys

    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    config = write(tmp_path, GOOD_CONFIG.replace("port: 1883}", f"port: 1883, tls: {{ca_certs: {junk}}}}}")
                   + f"bridge: {{spool: {tmp_path / 'spool.db'}, metrics_port: 0}}\n")
    result = subprocess.run([sys.executable, "paho_mqtt_client.py", str(config)], capture_output=True, text=True,
                            cwd=REPO, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "[INFO]" not in line]
    assert len(errors) == 1 and errors[0].startswith("error: mqtt.tls:"), result.stderr

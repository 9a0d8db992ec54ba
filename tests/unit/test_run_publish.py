"""The driver's commit retry while the output store fails (pipeline.run._publish)."""

import pytest

from pipeline import run


class FlakyPublisher:
    """MOCK at the store boundary: fails `failures` times with the error an S3 outage gives."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def publish(self, window):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("Could not connect to the endpoint URL")
        from pipeline.commit import WindowStats

        return WindowStats("s-w00001", len(window), 0, 0)


def test_publish_retries_until_the_store_is_back(monkeypatch):
    sleeps = []
    monkeypatch.setattr(run.time, "sleep", sleeps.append)
    pub = FlakyPublisher(3)
    run._publish(pub, ["src"], retry_s=600, summary=run.RunSummary("r", "o"))
    assert pub.calls == 4 and sleeps == [1.0, 2.0, 4.0]


def test_publish_gives_up_after_commit_retry_s(monkeypatch):
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    with pytest.raises(ConnectionError):
        run._publish(FlakyPublisher(100), ["src"], retry_s=0, summary=run.RunSummary("r", "o"))

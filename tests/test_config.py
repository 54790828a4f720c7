import pytest

from corral.config import Settings


def test_defaults():
    s = Settings.from_env({})
    assert (s.host, s.port, s.num_parallel) == ("127.0.0.1", 11434, 4)


def test_host_forms():
    assert Settings.from_env({"CORRAL_HOST": "0.0.0.0"}).host == "0.0.0.0"
    s = Settings.from_env({"CORRAL_HOST": "127.0.0.1:9999"})
    assert (s.host, s.port) == ("127.0.0.1", 9999)
    assert Settings.from_env({"CORRAL_HOST": ":8080"}).port == 8080


def test_bad_values_are_clear():
    with pytest.raises(ValueError, match="CORRAL_NUM_PARALLEL"):
        Settings.from_env({"CORRAL_NUM_PARALLEL": "many"})
    with pytest.raises(ValueError, match="CORRAL_NUM_PARALLEL"):
        Settings.from_env({"CORRAL_NUM_PARALLEL": "0"})

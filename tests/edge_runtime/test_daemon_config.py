"""The daemon's TOML configuration: search order, defaults, and one clear line for each mistake."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime import daemon_config
from edge_runtime.cli import main
from edge_runtime.daemon_config import SCHEMA, find_config, load_config, parse_config
from models.errors import EdgeNasError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "edge-nas.example.toml"


@pytest.fixture
def environ(tmp_path):
    """An environment with its own home and no systemd or XDG variables."""
    return {"HOME": str(tmp_path / "home")}


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, environ=None):
    return load_config(str(write(tmp_path, text)), environ or {"HOME": str(tmp_path)})


def test_empty_file_takes_defaults(tmp_path, environ):
    config = load_config(str(write(tmp_path, "")), environ)
    assert config.broker.url == "mqtt://localhost:1883"
    assert config.state_dir == tmp_path / "home" / ".local" / "state" / "edge-nas"
    assert config.data_dir == config.state_dir / "data"
    assert config.defaults.budget == 200
    assert config.defaults.finalists == 8
    assert config.defaults.arguments()["constraints"] == {}
    assert config.watch.enabled is False
    assert config.heartbeat_s == 30.0
    assert config.device_id  # the host name, reduced to a valid id


def test_state_dir_from_systemd_variable(tmp_path, environ):
    environ["STATE_DIRECTORY"] = "/var/lib/edge-nas:/var/lib/other"
    config = load_config(str(write(tmp_path, "")), environ)
    assert config.state_dir == Path("/var/lib/edge-nas")


def test_relative_paths_follow_config_folder(tmp_path, environ):
    config = load_config(str(write(tmp_path, 'state_dir = "state"\ndata_dir = "~/photos"\n')), environ)
    assert config.state_dir == tmp_path / "state"
    assert config.data_dir == Path("~/photos").expanduser()


def test_counts_accept_suffixes(tmp_path, environ):
    config = load_config(str(write(tmp_path, '[constraints]\nmax_params = "800k"\nmax_flops = 3000000\n')), environ)
    assert config.defaults.constraints["max_params"] == 800_000
    assert config.defaults.constraints["max_flops"] == 3_000_000


def test_system_file_comes_before_xdg(tmp_path, environ, monkeypatch):
    system = write(tmp_path, "", "system.toml")
    monkeypatch.setattr(daemon_config, "SYSTEM_CONFIG_PATH", system)
    environ["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    user = tmp_path / "xdg" / "edge-nas" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert find_config(None, environ) == system
    system.unlink()
    assert find_config(None, environ) == user


def test_xdg_default_is_home_config(tmp_path, environ, monkeypatch):
    monkeypatch.setattr(daemon_config, "SYSTEM_CONFIG_PATH", tmp_path / "absent.toml")
    user = tmp_path / "home" / ".config" / "edge-nas" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert find_config(None, environ) == user


def test_no_file_found_lists_searched_paths(tmp_path, environ, monkeypatch):
    monkeypatch.setattr(daemon_config, "SYSTEM_CONFIG_PATH", tmp_path / "absent.toml")
    with pytest.raises(EdgeNasError) as caught:
        find_config(None, environ)
    message = str(caught.value)
    assert str(tmp_path / "absent.toml") in message
    assert str(tmp_path / "home" / ".config" / "edge-nas" / "config.toml") in message
    assert "--config" in message


def test_missing_explicit_file_is_named(tmp_path, environ):
    with pytest.raises(EdgeNasError, match=r"configuration file .*nowhere\.toml not found; check the --config path"):
        load_config(str(tmp_path / "nowhere.toml"), environ)


@pytest.mark.parametrize("text, fragments", [
    ("device_id = [", ["invalid TOML", "fix the syntax"]),
    ("devce_id = 'a'", ["unknown key 'devce_id'", "did you mean 'device_id'"]),
    ("[broker]\nurll = 'mqtt://x'", ["unknown key 'broker.urll'", "did you mean 'broker.url'"]),
    ("[brokr]\nurl = 'mqtt://x'", ["unknown key 'brokr'", "did you mean 'broker'"]),
    ("[watch]\nzzz = 1", ["unknown key 'watch.zzz'", "known keys of [watch]: enabled, new_images, interval_s"]),
    ("[broker]\nkeepalive_s = '30'", ["broker.keepalive_s must be an integer, got string '30'", "without quotes"]),
    ("[watch]\nenabled = 1", ["watch.enabled must be a boolean, got integer 1"]),
    ("heartbeat_s = true", ["heartbeat_s must be a number, got boolean True"]),
    ("broker = 'mqtt://x'", ["broker must be a table ([broker])"]),
    ("heartbeat_s = 0", ["heartbeat_s must be above 0 and at most 86400, got 0.0"]),
    ("heartbeat_s = nan", ["heartbeat_s must be above 0 and at most 86400, got nan"]),
    ("heartbeat_s = 1e10", ["heartbeat_s must be above 0 and at most 86400"]),
    ("stop_timeout_s = inf", ["stop_timeout_s must be above 0 and at most 3600, got inf"]),
    ("[watch]\ninterval_s = -1", ["watch.interval_s must be a positive number, got -1.0"]),
    ("[broker]\nkeepalive_s = 2", ["broker.keepalive_s must be between 5 and 65535, got 2"]),
    ("[broker]\nkeepalive_s = 100000", ["broker.keepalive_s must be between 5 and 65535, got 100000"]),
    ("[broker]\nsession_expiry_s = 99999999999", ["broker.session_expiry_s must be between 0 and 4294967295"]),
    ("[personalize]\nseed = 99999999999", ["personalize.seed must be between 0 and 4294967295"]),
    ("[personalize]\ninput_size = 1000", ["personalize.input_size must be between 1 and 512, got 1000"]),
    ("[personalize]\nbatch_size = 4096", ["personalize.batch_size must be between 2 and 1024"]),
    ("[personalize]\nwidth_mult = 0.5", ["personalize.width_mult is set", "'nb201' has no width multiplier"]),
    ("[personalize]\nspace = 'mobilenetv2'\nwidth_mult = 5.0", ["personalize.width_mult must be above 0 and at most 4"]),
    ("device_id = 'operator'", ["device_id 'operator' is the broker user name of the controllers"]),
    ("device_id = 'coordinator'", ["device_id 'coordinator' is the broker user name of the cloud coordinators"]),
    ("log_level = 'loud'", ["log_level must be one of 'debug', 'info', 'warning', 'error'"]),
    ("device_id = 'a/b'", ["device_id: invalid device id 'a/b'"]),
    ("device_id = ''", ["device_id is empty"]),
    ("[broker]\nurl = 'http://x'", ["broker.url: invalid broker URL", "mqtt:// or mqtts://"]),
    ("[broker]\nusername = 'u'\npassword_file = 'absent.secret'", ["[broker]", "absent.secret"]),
    ("[personalize]\nbudget = 4\nfinalists = 5", ["personalize.finalists (5) must not exceed personalize.budget (4)"]),
    ("[personalize]\nspace = 'resnet'", ["personalize.space 'resnet' is not a search space", "nb201"]),
    ("[constraints]\nmax_params = 'lots'", ["constraints.max_params 'lots' is not a count"]),
    ("[constraints]\nmax_latency_ms = -1", ["constraints.max_latency_ms must be a positive number"]),
])
def test_mistake_raises_one_line(tmp_path, environ, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(EdgeNasError) as caught:
        load_config(str(path), environ)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, message


def test_non_utf8_file_is_invalid_toml(tmp_path, environ):
    path = tmp_path / "config.toml"
    path.write_bytes(b"device_id = '\xff'\n")
    with pytest.raises(EdgeNasError, match=r"config\.toml: invalid TOML: the file is not UTF-8 .*save it as UTF-8"):
        load_config(str(path), environ)


def test_relative_config_path_gives_absolute_folders(tmp_path, environ, monkeypatch):
    write(tmp_path, 'state_dir = "state"\ndata_dir = "data"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config("config.toml", environ)
    assert config.state_dir == tmp_path / "state"
    assert config.data_dir == tmp_path / "data"
    assert config.state_dir.is_absolute()


def test_cli_reports_mistake_without_traceback(tmp_path):
    path = write(tmp_path, "[broker]\nkeepalive_s = 'x'\n")
    result = CliRunner().invoke(main, ["daemon", "--config", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "broker.keepalive_s" in lines[0]
    assert "Traceback" not in result.output


def test_cli_check_prints_effective_settings(tmp_path):
    path = write(tmp_path, "device_id = 'dev-9'\n[broker]\nurl = 'mqtt://127.0.0.1:1999'\n")
    result = CliRunner().invoke(main, ["daemon", "--config", str(path), "--check"])
    assert result.exit_code == 0, result.output
    assert '"device_id": "dev-9"' in result.stdout
    assert '"url": "mqtt://127.0.0.1:1999"' in result.stdout


def test_example_holds_every_key(tmp_path):
    """Every key of the schema appears in the example, set or commented out, under its table."""
    text = EXAMPLE.read_text()
    table = ""
    found = set()
    for line in text.splitlines():
        header = re.fullmatch(r"\[(\w+)\]", line.strip())
        if header:
            table = header.group(1)
            continue
        key = re.match(r"^(?:# )?(\w+) = ", line)
        if key:
            found.add((table, key.group(1)))
    expected = {(table, name) for table, keys in SCHEMA.items() for name in keys}
    assert expected - found == set()
    assert found - expected == set()


def test_example_values_are_defaults(tmp_path):
    """The keys the example sets hold the defaults, so loading it equals loading an empty file."""
    environ = {"HOME": str(tmp_path)}
    example = load_config(str(EXAMPLE), environ)
    empty = load_config(str(write(tmp_path, "")), environ)
    assert example.describe() == dict(empty.describe(), config_file=str(EXAMPLE))


def test_example_commented_values_are_valid(tmp_path):
    """Uncommenting every key of the example gives a valid configuration."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "broker.secret").write_text("secret\n")
    text = EXAMPLE.read_text()
    text = re.sub(r"(?m)^# (\w+ = )", r"\1", text)
    text = text.replace('"/etc/edge-nas/broker.secret"', '"etc/broker.secret"')
    text = text.replace('url = "mqtt://localhost:1883"', 'url = "mqtts://localhost:8883"')
    (tmp_path / "etc" / "ca.crt").write_text("")
    text = text.replace('"/etc/edge-nas/ca.crt"', '"etc/ca.crt"')
    text = text.replace('space = "nb201"', 'space = "mobilenetv2"')  # width_mult applies to mobilenetv2 only
    config = parse_config(tomllib.loads(text), tmp_path / "config.toml", {"HOME": str(tmp_path)})
    assert config.device_id == "jetson-7"
    assert config.defaults.constraints["max_flops"] == 450_000_000

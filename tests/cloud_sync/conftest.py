"""Fixtures: a real Mosquitto broker per test (127.0.0.1 only, a free port, its own config and persistence in tmp)."""
from __future__ import annotations

import shutil
import subprocess
from typing import List

import pytest

from broker_support import MOSQUITTO_CANDIDATES, Broker, FakeCoordinator, RunningCoordinator, find_program


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    binary = find_program("mosquitto", MOSQUITTO_CANDIDATES)
    if binary is None:
        pytest.skip("the mosquitto broker is not installed (Debian package mosquitto)")
    return binary


@pytest.fixture
def broker(mosquitto_binary, tmp_path):
    folder = tmp_path / "broker"
    folder.mkdir()
    instance = Broker(mosquitto_binary, folder)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def make_broker(mosquitto_binary, tmp_path):
    """A factory for brokers with extra configuration lines (authentication, ACL, TLS)."""
    started: List[Broker] = []

    def factory(extra_config: str = "", *, anonymous: bool = True, name: str = "custom") -> Broker:
        folder = tmp_path / f"broker-{name}"
        folder.mkdir()
        instance = Broker(mosquitto_binary, folder, extra_config, anonymous=anonymous)
        started.append(instance)
        instance.start()
        return instance

    yield factory
    for instance in started:
        instance.stop()


@pytest.fixture
def password_file(tmp_path):
    """A Mosquitto password file made by mosquitto_passwd; returns a function that adds users."""
    binary = find_program("mosquitto_passwd", ("/usr/bin/mosquitto_passwd",))
    if binary is None:
        pytest.skip("mosquitto_passwd is not installed (Debian package mosquitto)")
    path = tmp_path / "passwd"

    def add(user: str, password: str) -> Path:
        arguments = [binary, "-b"] + ([] if path.exists() else ["-c"]) + [str(path), user, password]
        subprocess.run(arguments, check=True, capture_output=True, timeout=10)
        return path

    return add


@pytest.fixture
def secret_file(tmp_path):
    """Write a password into its own file (what --password-file reads)."""

    def write(name: str, password: str) -> Path:
        path = tmp_path / f"{name}.secret"
        path.write_text(password + "\n")
        return path

    return write


@pytest.fixture
def tls_files(tmp_path):
    """A private CA and a broker certificate for 127.0.0.1, made with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path / "tls"
    folder.mkdir()
    key_options = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*arguments: str) -> None:
        subprocess.run([openssl, *arguments], check=True, capture_output=True, cwd=folder, timeout=30)

    run("req", "-x509", *key_options, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=edge-nas test CA")
    run("req", *key_options, "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "broker.crt", "-days", "2", "-extfile", "san.ext")
    return {"ca": folder / "ca.crt", "cert": folder / "broker.crt", "key": folder / "broker.key"}


@pytest.fixture
def fake_coordinator():
    started: List[FakeCoordinator] = []

    def factory(settings, **options) -> FakeCoordinator:
        instance = FakeCoordinator(settings, **options)
        started.append(instance)
        return instance

    yield factory
    for instance in started:
        instance.close()


@pytest.fixture
def start_coordinator():
    """Start real coordinators (`serve` on threads; they import torch), stopped after the test."""
    running: List[RunningCoordinator] = []

    def start(url, coordinator_id="coord-a", **options):
        instance = RunningCoordinator(url, coordinator_id, **options)
        running.append(instance)
        return instance

    yield start
    for instance in running:
        instance.close()

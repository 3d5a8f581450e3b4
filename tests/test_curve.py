"""CURVE: only the keys a sink was told to let in get in, and a refused node says why, fast.
Refusals are shown by the clients' socket monitors, not by waiting to see nothing happen."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

from tests.checker import check
from tests.helpers import run_cli, wait_for
from zfan import AuthError, Producer, Sink, Subscriber, Worker, query_status
from zfan.config import Curve
from zfan.nodes.security import generate

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keys(tmp_path):
    """Keypairs for a sink and three nodes; the sink lets in node1 and node2 only."""
    folder, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("sink", "node1", "node2", "intruder"):
        generate(str(folder), name)
    for name in ("node1", "node2"):
        shutil.copy(folder / f"{name}.key", allowed)
    server = Curve(secret_file=str(folder / "sink.key_secret"), allow_keys=str(allowed))

    def client(name: str, server_key: str = "sink") -> Curve:
        return Curve(secret_file=str(folder / f"{name}.key_secret"), server_key=str(folder / f"{server_key}.key"))

    return server, client, folder


@pytest.fixture
def sink(keys, ipc, tmp_path, ctx):
    server, _, _ = keys
    with Sink(ledger=str(tmp_path / "z.db"), curve=server, **ipc) as s:
        yield s


def echo(records):
    return [r["id"] for r in records]


def test_allowed_keys_run_the_whole_pipeline_encrypted(sink, keys, ctx):
    _, client, _ = keys
    with (
        Worker(echo, control=sink.control, curve=client("node1"), context=ctx),
        Subscriber(results=sink.results, control=sink.control, curve=client("node2"), context=ctx) as sub,
    ):
        assert sub.wait_ready(10)
        with Producer(intake=sink.intake, control=sink.control, curve=client("node1"), context=ctx) as prod:
            prod.send_many({"id": i} for i in range(5000))
        got = []
        wait_for(
            lambda: (m := sub.recv(0.05)) is not None and got.append(m) or sum(len(m.records) for m in got) >= 5000,
            what="every result",
        )
    verdict = check(range(5000), [i for m in got for i in m.records], {"default": [m.seq for m in got]})
    assert verdict.ok, verdict


@pytest.mark.parametrize(
    "who, message",
    [
        ("intruder", "the sink refused this node's key (it is not in the sink's allow_keys=)"),
        ("wrong server key", "the encrypted handshake failed: is server_key= the sink's public key?"),
        ("plaintext", "the sink requires encryption: give secret_file= and server_key="),
    ],
)
def test_a_node_the_sink_does_not_let_in_is_refused_and_told_why(sink, keys, ctx, who, message):
    _, client, _ = keys
    curve = {
        "intruder": client("intruder"),
        "wrong server key": client("node1", server_key="intruder"),
        "plaintext": None,
    }[who]
    prod = Producer(intake=sink.intake, control=sink.control, curve=curve, context=ctx).start()
    try:
        with contextlib.suppress(AuthError):  # the refusal may come before this send or after it
            prod.send({"id": 1})
        wait_for(lambda: not prod.running, timeout=5, what="the handshake to fail")
        assert isinstance(prod.error, AuthError)
        assert str(prod.error).endswith(message)
        with pytest.raises(AuthError):
            prod.flush(timeout=1)
    finally:
        prod.close(timeout=0.1)
    _, client, _ = keys
    info = query_status(sink.control, curve=client("node1"), context=ctx)
    assert info.get("records_in", 0) == 0 and info["producers"] == 0


def test_a_producer_id_belongs_to_the_key_that_first_used_it(sink, keys, ctx):
    _, client, _ = keys
    with (
        Worker(echo, control=sink.control, curve=client("node1"), context=ctx),
        Subscriber(results=sink.results, control=sink.control, curve=client("node1"), context=ctx) as sub,
    ):
        assert sub.wait_ready(10)
        with Producer(
            intake=sink.intake, control=sink.control, producer_id="plant-7", curve=client("node1"), context=ctx
        ) as owner:
            owner.send_many({"id": i} for i in range(100))
            owner.flush()
            # node2 is let in, but may not speak as plant-7: no welcome, no acks, nothing stored.
            spoof = Producer(
                intake=sink.intake, control=sink.control, producer_id="plant-7", curve=client("node2"), context=ctx
            ).start()
            try:
                spoof.send_many({"id": -i} for i in range(1, 101))
                wait_for(
                    lambda: (
                        query_status(sink.control, curve=client("node1"), context=ctx)["rejected"].get(
                            "producer id of another key", 0
                        )
                        >= 1
                    ),
                    what="the spoofing hello refused",
                )
                assert not spoof.connected.is_set()
            finally:
                with pytest.raises(Exception, match="not acknowledged"):
                    spoof.close(timeout=0.5)
        got = []
        wait_for(
            lambda: (m := sub.recv(0.05)) is not None and got.append(m) or sum(len(m.records) for m in got) >= 100,
            what="the owner's results",
        )
        assert sub.recv(0.3) is None
    assert sorted(i for m in got for i in m.records) == list(range(100))
    assert query_status(sink.control, curve=client("node1"), context=ctx)["records_in"] == 100


def rejected(sink, client, ctx, reason: str) -> int:
    return query_status(sink.control, curve=client("node1"), context=ctx)["rejected"].get(reason, 0)


def handshake_error(sink, curve, ctx, what: str) -> BaseException | None:
    """Start a producer with these keys; once its handshake has ended it, what it ended with."""
    prod = Producer(intake=sink.intake, control=sink.control, curve=curve, context=ctx).start()
    try:
        wait_for(lambda: not prod.running, timeout=5, what=what)
        return prod.error
    finally:
        prod.close(timeout=0.1)


def test_a_key_added_to_the_folder_is_let_in_at_once(sink, keys, tmp_path, ctx):
    _, client, folder = keys
    assert isinstance(handshake_error(sink, client("intruder"), ctx, "the unknown key refused"), AuthError)
    # Added right after a refusal: the folder has changed, so it is read again for this knock.
    shutil.copy(folder / "intruder.key", tmp_path / "allowed")
    with Producer(intake=sink.intake, control=sink.control, curve=client("intruder"), context=ctx) as prod:
        prod.send_many({"id": i} for i in range(10))
        prod.flush(timeout=5)
    assert query_status(sink.control, curve=client("node1"), context=ctx)["records_in"] == 10


def test_a_key_removed_from_the_folder_is_refused_on_the_connections_it_holds(sink, keys, tmp_path, ctx):
    _, client, _ = keys
    with Worker(echo, control=sink.control, curve=client("node1"), context=ctx):
        prod = Producer(intake=sink.intake, control=sink.control, curve=client("node2"), context=ctx).start()
        try:
            prod.send_many({"id": i} for i in range(100))
            prod.flush(timeout=5)
            os.remove(tmp_path / "allowed" / "node2.key")
            # The folder is looked at once a second: the producer's heartbeats show when.
            wait_for(lambda: rejected(sink, client, ctx, "key not allowed") >= 1, what="the removed key refused")
            prod.send_many({"id": i} for i in range(100, 200))
        finally:
            with pytest.raises(Exception, match="not acknowledged"):
                prod.close(timeout=0.5)
        info = query_status(sink.control, curve=client("node1"), context=ctx)
        assert info["records_in"] == 100
        # ... and a new connection with it is refused at the handshake.
        assert isinstance(
            handshake_error(sink, client("node2"), ctx, "the removed key refused a new connection"), AuthError
        )


def test_a_producer_id_stays_with_its_key_across_a_sink_restart(keys, ipc, tmp_path, ctx):
    server, client, _ = keys
    ledger = str(tmp_path / "z.db")
    with Sink(ledger=ledger, curve=server, **ipc) as sink:
        with Producer(
            intake=sink.intake, control=sink.control, producer_id="plant-7", curve=client("node1"), context=ctx
        ) as owner:
            owner.send_many({"id": i} for i in range(10))
    with Sink(ledger=ledger, curve=server, **ipc) as sink:
        spoof = Producer(
            intake=sink.intake, control=sink.control, producer_id="plant-7", curve=client("node2"), context=ctx
        ).start()
        try:
            spoof.send({"id": -1})
            wait_for(
                lambda: rejected(sink, client, ctx, "producer id of another key") >= 1,
                what="the spoofing hello refused",
            )
            assert not spoof.connected.is_set()
        finally:
            with pytest.raises(Exception, match="not acknowledged"):
                spoof.close(timeout=0.5)
        with Producer(
            intake=sink.intake, control=sink.control, producer_id="plant-7", curve=client("node1"), context=ctx
        ) as owner:
            owner.send_many({"id": i} for i in range(10, 20))
        assert query_status(sink.control, curve=client("node1"), context=ctx)["records_in"] == 10


def cli_env(folder) -> dict[str, str]:
    return {"ZFAN_CURVE_SECRET": str(folder / "intruder.key_secret"), "ZFAN_CURVE_SERVER_KEY": str(folder / "sink.key")}


def test_cli_refused_key_exits_with_one_line_and_the_sink_logs_it(keys, ipc, tmp_path, roles):
    server, client, folder = keys
    sink = roles(
        "sink",
        "--ledger",
        str(tmp_path / "z.db"),
        f"--intake={ipc['intake']}",
        f"--control={ipc['control']}",
        f"--results={ipc['results']}",
        "--curve-secret",
        server.secret_file,
        "--allow-keys",
        server.allow_keys,
    )
    sink.wait_ready()
    res = run_cli(
        "produce",
        "--count",
        "10",
        f"--intake={ipc['intake']}",
        f"--control={ipc['control']}",
        "--curve-secret",
        str(folder / "intruder.key_secret"),
        "--curve-server-key",
        str(folder / "sink.key"),
        timeout=20,
    )
    assert res.returncode == 7, res.stderr
    assert "zfan produce: error: cannot connect to" in res.stderr and "--allow-keys" in res.stderr
    assert "Traceback" not in res.stderr
    wait_for(lambda: "refused a connection" in sink.stderr, what="the sink to log the refusal")
    assert sink.stop() == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "produce",
                "--count",
                "1",
                "--curve-secret",
                "{k}/missing.key_secret",
                "--curve-server-key",
                "{k}/sink.key",
            ],
            "--curve-secret {k}/missing.key_secret: no such file",
        ),
        (
            ["produce", "--count", "1", "--curve-secret", "{k}/node1.key", "--curve-server-key", "{k}/sink.key"],
            "holds no secret key (give the .key_secret file)",
        ),
        (
            ["produce", "--count", "1", "--curve-secret", "{k}/node1.key_secret"],
            "a client also needs --curve-server-key",
        ),
        (
            ["produce", "--count", "1", "--curve-server-key", "{k}/sink.key"],
            "--curve-server-key needs --curve-secret too",
        ),
        (
            ["sink", "--curve-secret", "{k}/sink.key_secret"],
            "also needs --allow-keys (a folder of the public keys it lets in)",
        ),
        (
            ["sink", "--curve-secret", "{k}/sink.key_secret", "--allow-keys", "{k}/nowhere"],
            "--allow-keys {k}/nowhere: no such folder",
        ),
        (["keys", "generate", "{k}", "node1"], "node1.key exists already: not overwritten"),
    ],
)
def test_key_mistakes_get_one_clear_line(keys, args, message):
    _, _, folder = keys
    res = run_cli(*[a.format(k=folder) for a in args])
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message.format(k=folder) in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_keys_generate_writes_a_keypair_with_a_private_secret(tmp_path):
    res = run_cli("keys", "generate", str(tmp_path / "k"), "plant")
    assert res.returncode == 0, res.stderr
    assert os.path.exists(tmp_path / "k" / "plant.key")
    assert os.stat(tmp_path / "k" / "plant.key_secret").st_mode & 0o077 == 0

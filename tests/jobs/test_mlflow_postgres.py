"""MLflow's registry on PostgreSQL (the cluster deployment's backend store), against a real
PostgreSQL server: the one on 127.0.0.1:5432 when it answers, else one this test starts
(initdb + pg_ctl on a free port in a temporary folder). Each run gets a fresh database.

A lean MLflow server runs on that database; PredictorRegistry (jobs/registry.py) registers
versions, sets and moves the alias 'champion', and reads both back, also after the server was
restarted (what survives lives in PostgreSQL, not in the server)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import free_port, start_mlflow

pytestmark = pytest.mark.service
psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary is a test dependency (pyproject)")


def _answers(host: str, port: int, user: str, dbname: str = "postgres") -> bool:
    try:
        psycopg2.connect(host=host, port=port, user=user, dbname=dbname, connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        pytest.fail(f"no PostgreSQL answers on 127.0.0.1:5432 and {name} is not installed "
                    "(apt-get install -y postgresql)")
    return found


@contextmanager
def own_postgres():
    """A throwaway PostgreSQL server: trust auth, 127.0.0.1 only, a free port, in a temporary
    folder. initdb refuses to run as root, so as root the server runs as the 'postgres' system
    user (pytest's tmp_path is private to root, hence a folder of its own)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    folder = Path(tempfile.mkdtemp(prefix="shadowgate-pg-"))
    data, port = folder / "data", free_port()
    as_user: list[str] = []
    user = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root needs a 'postgres' system user for initdb")
        as_user, user = ["runuser", "-u", "postgres", "--"], "postgres"
        shutil.chown(folder, "postgres")
    subprocess.run(as_user + [initdb, "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8"],
                   check=True, stdout=subprocess.DEVNULL)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder}"
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(folder / "server.log"), "-w",
                              "start"], check=True, stdout=subprocess.DEVNULL)
    try:
        yield "127.0.0.1", port, user
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], stdout=subprocess.DEVNULL)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    """(host, port, user) of a PostgreSQL server that answers."""
    for user in ("postgres", pwd.getpwuid(os.geteuid()).pw_name):
        if _answers("127.0.0.1", 5432, user):
            yield "127.0.0.1", 5432, user
            return
    with own_postgres() as server:
        yield server


@pytest.fixture()
def database(postgres):
    """A fresh database for this test, dropped afterwards."""
    host, port, user = postgres
    name = f"mlflow_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host=host, port=port, user=user, dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    # SQLAlchemy 2.1 takes psycopg (3) for a bare postgresql://: name the driver installed
    yield f"postgresql+psycopg2://{user}@{host}:{port}/{name}", (host, port, user, name)
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def predictor_folder(folder: Path, seed: int) -> Path:
    """The files a version holds (registry.check_reference wants the drift reference)."""
    (folder / "reference").mkdir(parents=True)
    (folder / "predictor.json").write_text(f'{{"seed": {seed}}}')
    (folder / "predictor.safetensors").write_bytes(os.urandom(256))
    (folder / "reference" / "features.parquet").write_bytes(b"features")
    (folder / "reference" / "basis.safetensors").write_bytes(b"basis")
    return folder


def test_registry_versions_and_aliases_live_in_postgres(database, tmp_path):
    from jobs.registry import PredictorRegistry

    store_uri, (host, port, user, dbname) = database
    with start_mlflow(tmp_path / "server", store_uri=store_uri) as server:
        reg = PredictorRegistry(server.uri, "pg-predictor", cache_dir=tmp_path / "cache")
        assert reg.resolve("champion") is None
        v1 = reg.register(predictor_folder(tmp_path / "p1", 1), tags={"shadowgate.method": "shadowllm"})
        v2 = reg.register(predictor_folder(tmp_path / "p2", 2))
        assert (v1, v2) == ("1", "2")
        reg.set_alias("champion", v1)
        reg.set_alias("candidate", v2)
        assert reg.resolve("champion") == "1"
        assert reg.aliases() == {"champion": "1", "candidate": "2"}
        assert reg.version(v1).tags["shadowgate.method"] == "shadowllm"
        got = reg.download(reg.resolve("champion"))
        assert (got / "predictor.json").read_text() == '{"seed": 1}'
        assert (got / "predictor.safetensors").read_bytes() == (tmp_path / "p1" / "predictor.safetensors").read_bytes()
        reg.set_alias("champion", v2)  # a promotion moves the alias

    # the rows are in PostgreSQL: MLflow's schema, the model, both versions, the moved alias
    conn = psycopg2.connect(host=host, port=port, user=user, dbname=dbname)
    with conn.cursor() as cur:
        cur.execute("SELECT version FROM model_versions WHERE name = %s ORDER BY version", ("pg-predictor",))
        assert [r[0] for r in cur.fetchall()] == [1, 2]
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias",
                    ("pg-predictor",))
        assert cur.fetchall() == [("candidate", 2), ("champion", 2)]
    conn.close()

    # a new server process on the same database serves the same registry
    with start_mlflow(tmp_path / "server", store_uri=store_uri) as server:
        reg = PredictorRegistry(server.uri, "pg-predictor", cache_dir=tmp_path / "cache2")
        assert reg.resolve("champion") == "2"
        assert [mv.version for mv in reg.versions()] == ["2", "1"]
        assert (reg.download("2") / "predictor.json").read_text() == '{"seed": 2}'


def test_own_postgres_server_when_none_answers():
    """The fall-back path of the fixture: a server of our own on a free port answers and takes
    MLflow's schema (on machines without a PostgreSQL service)."""
    with own_postgres() as (host, port, user):
        assert port != 5432 and _answers(host, port, user)
        from sqlalchemy import create_engine, inspect

        from mlflow.store.db.utils import _initialize_tables

        engine = create_engine(f"postgresql+psycopg2://{user}@{host}:{port}/postgres")
        _initialize_tables(engine)
        assert {"experiments", "model_versions", "registered_model_aliases"} <= set(inspect(engine).get_table_names())
        engine.dispose()

"""Lineage you can see: a tiny pipeline, its model registry, and `forge ui` in a real browser.

One small run (data, tokenizer, tokenize, pretrain-1) is shared by the module. The browser is
Debian's headless Chromium driven by Selenium through /usr/bin/chromedriver (Selenium Manager is
never asked to download anything); CI installs both (.ci/run). Set FORGE_SAVE_SCREENSHOT=PATH to
keep a copy of the stage-run screenshot (the README's docs/mlflow-ui.png).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.helpers import ROOT, SMALL, executed, forge, last_result

pytestmark = pytest.mark.slow
ONLY = "data|tokenizer|tokenize|pretrain-1"
NAME = "granite-4.1-tiny.pretrain-1"          # <pipeline>.<stage>
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def built(prefect_server, tmp_path_factory):
    store = tmp_path_factory.mktemp("ui-store")
    forge("run", *SMALL, "--only", ONLY, store=store)
    return store, last_result(store)


def _client(store: Path):
    from mlflow import MlflowClient
    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def _versions(client, name: str = NAME) -> list:
    return list(client.search_model_versions(f"name = '{name}'"))


def test_model_stage_is_registered_with_its_lineage(built):
    store, result = built
    client = _client(store)
    rec = result["stages"]["pretrain-1"]
    [version] = _versions(client)
    run = client.get_run(version.run_id)
    tags = version.tags
    assert tags["forge.key"] == rec["key"] == run.data.tags["forge.key"]
    assert tags["forge.stage"] == "pretrain-1" and tags["forge.source_run"] == run.info.run_id
    assert json.loads(tags["forge.parent_keys"]) == {"tokenize": result["stages"]["tokenize"]["key"]}
    # what fed it: the mixture's token files, with the digests the run recorded
    fed = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert json.loads(tags["forge.datasets"]) == fed and len(fed) >= 5
    assert tags["forge.git_commit"] == run.data.tags["mlflow.source.git.commit"]
    assert len(tags["forge.config_digest"]) == 64
    # the version is the stage's LoggedModel, and the model lists the version
    [out] = run.outputs.model_outputs
    assert version.source == f"models:/{out.model_id}" and tags["forge.model_id"] == out.model_id
    model = client.get_logged_model(out.model_id)
    assert {"name": NAME, "version": version.version} in json.loads(model.tags["mlflow.modelVersions"])
    assert tags["forge.uri"] == model.tags["forge.uri"]
    # data stages make no model, so no registered model either
    assert not _versions(client, "granite-4.1-tiny.tokenize")
    # artifacts live beside mlflow.db, not in ./mlruns of whichever directory ran the pipeline
    exp = client.get_experiment_by_name("granite-forge")
    assert exp.artifact_location == (store / "mlartifacts").as_uri()
    assert list((store / "mlartifacts").rglob("model_manifest.json"))


def test_cached_rerun_registers_no_second_version(built):
    store, result = built
    forge("run", *SMALL, "--only", ONLY, store=store)
    assert executed(last_result(store)) == set()
    assert len(_versions(_client(store))) == 1
    # a store from before the registry (or MLflow down at the time): the cached stage is
    # registered when next seen, still once. Such a store has no lineage notes either (they are
    # written once MLflow holds a stage; with them a cached rerun opens no MLflow at all)
    _client(store).delete_registered_model(NAME)
    for note in store.glob("*/lineage.json"):
        note.unlink()
    forge("run", *SMALL, "--only", ONLY, store=store)
    [version] = _versions(_client(store))
    assert version.tags["forge.key"] == result["stages"]["pretrain-1"]["key"]


def test_promote_sets_the_alias_and_names_a_stage_never_run(built):
    store, result = built
    out = forge("promote", "pretrain-1", *SMALL, "--alias", "champion", store=store)
    assert f"models:/{NAME}@champion" in out.stdout
    version = _client(store).get_model_version_by_alias(NAME, "champion")
    assert version.tags["forge.key"] == result["stages"]["pretrain-1"]["key"]
    never = forge("promote", "pretrain-2", *SMALL, store=store, check=False)
    assert never.returncode == 1 and "stage pretrain-2" in never.stderr, never.stderr
    assert "never run" in never.stderr
    data = forge("promote", "tokenize", *SMALL, store=store, check=False)
    assert data.returncode == 2 and "makes no model" in data.stderr, data.stderr


# -- the browser ------------------------------------------------------------------------------
def _chrome():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: the MLflow UI test needs Debian's Chromium; "
                    "install it with: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1100"):
        opts.add_argument(arg)
    # an explicit driver path: Selenium Manager is skipped (it would try to download one)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


@pytest.fixture
def ui_url(built, tmp_path):
    """`forge ui` itself, in the foreground of a child process, stopped as Ctrl-C would."""
    store, _ = built
    from flows.tracking.ui import free_port
    log = tmp_path / "forge-ui.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--store", str(store),
                                 "--port", str(free_port())], cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while "MLflow UI: " not in log.read_text():  # printed once /health answers
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"forge ui did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    url = log.read_text().split("MLflow UI: ")[1].split()[0]
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert "stopping mlflow server" in log.read_text()


def test_ui_shows_the_pipeline_its_stages_models_and_registry(built, ui_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    store, result = built
    client = _client(store)
    exp = client.get_experiment_by_name("granite-forge").experiment_id
    parent = client.get_run(result["parent_run"])
    version = _versions(client)[0]
    stage_run = client.get_run(version.run_id)
    model_id = stage_run.outputs.model_outputs[0].model_id
    client.set_registered_model_alias(NAME, "champion", version.version)
    mode = "?workflowType=machine_learning"   # the UI's model-training view, not GenAI's

    driver = _chrome()
    wait = WebDriverWait(driver, 60)

    def page_shows(*texts: str) -> None:
        wait.until(lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))
        for close in driver.find_elements(By.CSS_SELECTOR,
                                          '[data-component-id="mlflow.assistant.chat_panel.close"]'):
            close.click()   # the assistant panel hides a third of every screenshot

    def shot(name: str) -> Path:
        path = tmp_path / f"{name}.png"
        assert driver.save_screenshot(str(path))
        return path

    def follow(link_text: str, leads_to: str) -> None:
        wait.until(lambda d: d.find_elements(By.LINK_TEXT, link_text))[0].click()
        wait.until(lambda d: leads_to in d.current_url)
        driver.get(driver.current_url.split("?")[0] + mode)  # links drop the view; keep it

    try:
        # the pipeline's run in the experiment's run list, then its page with the stage runs
        driver.get(f"{ui_url}/#/experiments/{exp}/runs{mode}")
        page_shows(parent.info.run_name)
        shot("runs")
        follow(parent.info.run_name, parent.info.run_id)
        page_shows("Child runs")
        for stage in ("data", "tokenizer", "tokenize", "pretrain-1"):
            wait.until(lambda d: d.find_elements(By.LINK_TEXT, stage))
        shot("pipeline-run")
        # a stage run: its parent, the datasets it read (with digests), its registered model
        follow("pretrain-1", stage_run.info.run_id)
        page_shows("Parent run", parent.info.run_name, "Datasets", "tokenize/", NAME)
        stage_shot = shot("stage-run")
        # the logged model and the run that produced it
        driver.get(f"{ui_url}/#/experiments/{exp}/models{mode}")
        follow("pretrain-1", model_id)
        page_shows("Source run", "pretrain-1", "Model versions", NAME)
        shot("logged-model")
        # the registered version: its source run and model, alias and lineage tags
        driver.get(f"{ui_url}/#/models/{NAME}/versions/{version.version}{mode}")
        page_shows("Source Run", "Source Model", "champion", "forge.key",
                   result["stages"]["pretrain-1"]["key"], "forge.datasets")
        shot("model-version")
    finally:
        driver.quit()
    if os.environ.get("FORGE_SAVE_SCREENSHOT"):
        keep = Path(os.environ["FORGE_SAVE_SCREENSHOT"])
        keep = keep if keep.is_absolute() else ROOT / keep
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stage_shot, keep)

"""vedrt serve with a text model (bert2gpt2 + a word tokenizer): TEXT in over tritonclient (JSON
and binary), /v1/generate for curl, many clients at once, and the 400s for the wrong modality.

Every answer is compared with `Generator.generate_text` on the same export (itself checked against
transformers in tests/test_text_models.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is part of dev")
pytest.importorskip("torch")
requests = pytest.importorskip("requests")
httpclient = pytest.importorskip("tritonclient.http")

from test_text_models import text_model, word_tokenizer  # noqa: E402

from vedrt.runtime import load  # noqa: E402
from vedrt.serve import ServeOptions, build_app  # noqa: E402
from vedrt.serve.local import running  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCENES = ROOT / "vedrt" / "models" / "scenes"
PNG = sorted((ROOT / "examples").glob("scene*.png"))[0].read_bytes()
NAME = "bert2gpt2"
TEXTS = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13"]
GREEDY = {"max_new_tokens": 6}
BEAMS = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from vedrt.export import export_model

    out = tmp_path_factory.mktemp("serve-text") / "export"
    export_model(text_model("bert", "gpt2", seed=3), out, tokenizer=word_tokenizer())
    return out


@pytest.fixture(scope="module")
def reference(export):
    return load(export, threads=1)


@pytest.fixture(scope="module")
def server(export):
    with running(build_app(ServeOptions(model=str(export), name=NAME, threads=1))) as live:
        yield live


def client_for(server):
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)


def text_tensor(texts, binary: bool, name: str = "TEXT"):
    tensor = httpclient.InferInput(name, [len(texts)], "BYTES")
    if binary:
        data = np.array([t.encode() for t in texts], dtype=object)
    else:
        data = np.array(texts, dtype=object)
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def as_text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def test_metadata_and_config_advertise_text(server):
    client = client_for(server)
    meta = client.get_model_metadata(NAME)
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("TEXT", "BYTES")]
    assert {t["name"]: t["datatype"] for t in meta["outputs"]} == {
        "OUTPUT": "BYTES",
        "TOKENS": "INT64",
    }
    config = client.get_model_config(NAME)
    assert [t["name"] for t in config["input"]] == ["TEXT"]
    assert {t["name"] for t in config["output"]} == {"OUTPUT", "TOKENS"}


@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beam3x2"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_text_matches_generate_text(server, reference, binary, options):
    client = client_for(server)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT", binary_data=binary),
        httpclient.InferRequestedOutput("TOKENS", binary_data=binary),
    ]
    result = client.infer(NAME, [text_tensor(TEXTS, binary)], outputs=outputs, parameters=options)
    expected = reference.generate_text(TEXTS, **options)
    assert as_text(result.as_numpy("OUTPUT")) == expected
    assert len(expected) == len(TEXTS) * options.get("num_return_sequences", 1)
    tokens = result.as_numpy("TOKENS")
    assert tokens.shape[0] == len(expected)
    assert reference.decode(tokens) == expected


def test_v1_generate_json_and_form(server, reference):
    answer = requests.post(
        f"{server.url}/v1/generate", params=BEAMS, json={"texts": TEXTS}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"outputs": reference.generate_text(TEXTS, **BEAMS)}

    as_curl_d = requests.post(  # curl -d '{...}' without -H: labelled a form, still JSON
        f"{server.url}/v1/generate",
        params=GREEDY,
        data=b'{"texts": ["w9 w10"]}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert as_curl_d.json() == {"outputs": reference.generate_text(["w9 w10"], **GREEDY)}

    form = [("text", t) for t in TEXTS]
    answer = requests.post(f"{server.url}/v1/generate", params=GREEDY, data=form, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"] == reference.generate_text(TEXTS, **GREEDY)

    # the JSON body's other keys are options, as a form's other fields are (they were ignored)
    in_body = requests.post(f"{server.url}/v1/generate", json={"texts": TEXTS, **BEAMS}, timeout=60)
    assert in_body.json() == {"outputs": reference.generate_text(TEXTS, **BEAMS)}
    for extra, words in (
        ({"bogus": 1}, "unknown option 'bogus'"),
        ({"max_new_tokens": 99}, "twice"),
    ):
        answer = requests.post(
            f"{server.url}/v1/generate", params=GREEDY, json={"texts": TEXTS, **extra}, timeout=60
        )
        assert answer.status_code == 400 and words in answer.json()["error"], answer.text

    files = [("text", (None, t)) for t in TEXTS[:2]] + [("max_new_tokens", (None, "6"))]
    answer = requests.post(f"{server.url}/v1/generate", files=files, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"] == reference.generate_text(TEXTS[:2], **GREEDY)


def test_8_concurrent_clients_all_correct(server, reference):
    """Requests of one or two texts of different lengths, greedy and beam, batched together."""
    words = [f"w{i}" for i in range(5, 60)]
    cases = []
    for i in range(8):
        texts = [" ".join(words[i * 3 : i * 3 + 2 + i % 5])]
        if i % 3 == 0:
            texts.append(" ".join(words[i : i + 1]))
        cases.append((texts, BEAMS if i % 2 else GREEDY))
    expected = [reference.generate_text(texts, **options) for texts, options in cases]
    assert len({tuple(e) for e in expected}) > 1  # answers differ: a mix-up would show

    def ask(case):
        texts, options = case
        answer = requests.post(
            f"{server.url}/v1/generate", params=options, json={"texts": texts}, timeout=60
        )
        return answer.status_code, answer.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, cases))
    assert [status for status, _ in answers] == [200] * 8, answers
    assert [body["outputs"] for _, body in answers] == expected


def error_of(answer) -> str:
    assert answer.status_code == 400, (answer.status_code, answer.text)
    return answer.json()["error"]


def test_bad_text_requests_are_400(server, reference):
    url = f"{server.url}/v2/models/{NAME}/infer"
    image = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}
    assert "TEXT" in error_of(requests.post(url, json={"inputs": [image]}, timeout=60))
    empty = {"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["w5", ""]}
    assert "text 1: empty" in error_of(requests.post(url, json={"inputs": [empty]}, timeout=60))
    positions = reference.manifest.encoder["max_positions"]
    long_text = " ".join(["w7"] * (positions + 1))
    long = {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [long_text]}
    message = error_of(requests.post(url, json={"inputs": [long]}, timeout=60))
    assert f"{positions} positions" in message

    generate = f"{server.url}/v1/generate"
    assert "empty" in error_of(requests.post(generate, json={"texts": [""]}, timeout=60))
    assert "texts" in error_of(requests.post(generate, json={"text": "w5"}, timeout=60))
    assert "unknown option" in error_of(
        requests.post(generate, params={"beams": 2}, json={"texts": ["w5"]}, timeout=60)
    )
    # a lone surrogate is valid JSON but no text (it was a 500 from the tokenizer)
    lone = '{"texts": ["w5", "w6 \\ud800"]}'
    answer = requests.post(
        generate, data=lone, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert answer.status_code == 400 and "text 1: not valid Unicode" in error_of(answer)
    from vedrt.errors import InputError

    with pytest.raises(InputError, match="lone surrogate"):
        reference.generate_text(["w5 \ud800"])
    # invalid UTF-8 in a multipart text field (Starlette would have read it as Latin-1)
    field = b'--XX\r\nContent-Disposition: form-data; name="text"\r\n\r\nw5 \xff\r\n--XX--\r\n'
    kind = {"Content-Type": "multipart/form-data; boundary=XX"}
    answer = requests.post(generate, data=field, headers=kind, timeout=60)
    assert answer.status_code == 400 and "not valid utf-8" in error_of(answer)
    valid = "w5 é".encode()  # valid UTF-8 beyond ASCII stays a text
    field = (
        b'--XX\r\nContent-Disposition: form-data; name="text"\r\n\r\n' + valid + b"\r\n--XX--\r\n"
    )
    assert requests.post(generate, data=field, headers=kind, timeout=60).status_code == 200
    caption = requests.post(f"{server.url}/v1/caption", data=PNG, timeout=60)
    assert "/v1/generate" in error_of(caption)
    ok = requests.post(generate, params=GREEDY, json={"texts": TEXTS[:1]}, timeout=60)
    assert ok.json()["outputs"] == reference.generate_text(TEXTS[:1], **GREEDY)


def test_image_model_refuses_text():
    options = ServeOptions(model=str(SCENES), threads=1, start_engine=False)
    with running(build_app(options)) as live:
        url = f"{live.url}/v2/models/scenes/infer"
        text = {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a dog"]}
        message = error_of(requests.post(url, json={"inputs": [text]}, timeout=60))
        assert "IMAGE" in message and "TEXT" in message
        answer = requests.post(f"{live.url}/v1/generate", json={"texts": ["a dog"]}, timeout=60)
        assert "/v1/caption" in error_of(answer)

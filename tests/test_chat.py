"""Chat templates render as transformers renders them (fixture made once with transformers, see
fixtures/chat/make_fixture.py), and conversational prompts files read into that text or a FILE:LINE error."""

import json
from pathlib import Path

import pytest

from selfplay.chat import TOKENIZER_CONFIG_FILE, ChatTemplate, ChatTemplateError, load_chat_template, read_chat_template
from selfplay.data import DataError, read_prompt_rows, read_prompts

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "chat" / "chat_templates.json").read_text())


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"{c['template']}-{len(c['messages'])}")
def test_rendering_matches_transformers(case):
    template = ChatTemplate(FIXTURE["templates"][case["template"]], FIXTURE["special_tokens"], source="fixture")
    if "error" in case:
        with pytest.raises(ChatTemplateError, match=rf"^fixture: the chat template refused the conversation: {case['error']}"):
            template.render(case["messages"])
    else:
        assert template.render(case["messages"]) == case["expected"]


def _write_config(run_dir: Path, chat_template, **extra) -> Path:
    path = run_dir / TOKENIZER_CONFIG_FILE
    path.write_text(json.dumps({"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
                                "chat_template": chat_template, **extra}))  # fmt: skip
    return path


def test_template_from_tokenizer_config_string_or_named_list(tmp_path):
    case = next(c for c in FIXTURE["cases"] if c["template"] == "llama2" and "expected" in c)
    llama2 = FIXTURE["templates"]["llama2"]
    _write_config(tmp_path, llama2)
    assert load_chat_template(tmp_path).render(case["messages"]) == case["expected"]  # bos_token as an AddedToken mapping
    _write_config(tmp_path, [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": llama2}])
    assert load_chat_template(tmp_path).render(case["messages"]) == case["expected"]
    path = _write_config(tmp_path, [{"name": "tool_use", "template": "tools"}])
    with pytest.raises(ChatTemplateError, match=rf"^{path}: chat_template names tool_use but no 'default' template"):
        load_chat_template(tmp_path)
    _write_config(tmp_path, "{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match=rf"^{path}: chat_template is not a valid Jinja template"):
        load_chat_template(tmp_path)
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"eos_token": "</s>"}))
    assert load_chat_template(tmp_path) is None
    assert read_chat_template(tmp_path / "missing.json") is None


def test_sandbox_refuses_to_reach_python_internals():
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", {}, source="evil")
    with pytest.raises(ChatTemplateError, match="^evil: the chat template refused the conversation: .*unsafe"):
        evil.render([{"role": "user", "content": "x"}])


def test_conversational_and_plain_prompts_in_one_file(tmp_path):
    case = next(c for c in FIXTURE["cases"] if c["template"] == "chatml")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "plain text", "answer": "5"}) + "\n"
                       + json.dumps({"prompt": case["messages"], "answer": "8"}) + "\n")  # fmt: skip
    rows = read_prompt_rows(prompts)
    assert [r["answer"] for r in rows] == ["5", "8"] and [r["_line"] for r in rows] == [1, 2]
    _write_config(tmp_path, FIXTURE["templates"]["chatml"])
    assert read_prompts(prompts, load_chat_template(tmp_path)) == ["plain text", case["expected"]]
    with pytest.raises(DataError) as e:
        read_prompts(prompts, None)
    assert str(e.value).startswith(f"{prompts}:2: a conversational prompt needs the model's chat template")
    assert TOKENIZER_CONFIG_FILE in str(e.value)
    refused = next(c for c in FIXTURE["cases"] if "error" in c)
    prompts.write_text(json.dumps({"prompt": refused["messages"]}) + "\n")
    with pytest.raises(DataError, match=rf"^{prompts}:1: .*Conversation roles must alternate"):
        read_prompts(prompts, ChatTemplate(FIXTURE["templates"]["llama2"], FIXTURE["special_tokens"]))


def test_a_rendered_prompt_reads_its_control_tokens_as_ids_and_plain_text_does_not(tmp_path):
    """As transformers' apply_chat_template(tokenize=True): the template's <|im_start|>/<|im_end|> become their ids and
    nothing is added around the rendered text; a plain prompt keeps such strings as text and gets [bos] ... [sep]."""
    import tokenizers

    from selfplay.models.hf import import_hf
    from selfplay.tokenizer import Tokenizer

    src = Path(__file__).parent / "fixtures" / "hf" / "qwen2_instruct"
    run = tmp_path / "run"
    import_hf(src, run)
    tok = Tokenizer.load(run / "tokenizer.json")
    rendered = load_chat_template(run).render([{"role": "user", "content": "Write about rivers."}])
    ids = tok.encode_prompt(rendered)
    reference = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))  # special tokens matched, as transformers does
    assert ids == reference.encode(str(rendered), add_special_tokens=False).ids
    im_start, im_end = tok.tk.token_to_id("<|im_start|>"), tok.tk.token_to_id("<|im_end|>")
    assert ids[0] == im_start and im_end in ids and ids.count(im_start) == 2  # the user turn, then the assistant's
    plain = tok.encode_prompt(str(rendered))
    assert plain[0] == tok.bos_id and plain[-1] == tok.sep_id and im_end not in plain[1:-1]
    assert tok.encode("<|im_end|>") != [im_end]  # the flag is restored: plain text stays text

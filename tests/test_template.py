"""`--prompt-style template`: the folder's own chat template, rendered as transformers' apply_chat_template renders it."""

import json

import pytest

from conftest import write_hf_folder
from minirl import load_pretrained, save_pretrained
from minirl.errors import InputError
from minirl.evaluate import main as evaluate_main
from minirl.tiny import char_tokenizer
from minirl.tokenizer import format_prompt

# ChatML with a default system message when the conversation brings none, as SmolLM2's template has.
CHATML = """{%- for message in messages %}
{%- if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a careful assistant who answers arithmetic questions.<|im_end|>
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# Llama 3 style: bos_token, header tokens, a dated default system message, raise_exception, tojson, tools.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Today is " + strftime_now("%d %b %Y") + "." %}
{%- endif %}
{%- if tools is not none %}
    {{- raise_exception("this template takes no tools") }}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system_message }}
{{- " " + ({"turns": messages | length, "note": "a<b & c>d"} | tojson) + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("roles after the system message must be user or assistant") }}
    {%- endif %}
    {{- "<|start_header_id|>" + message['role'] + "<|end_header_id|>\\n\\n" + message['content'] | trim + "<|eot_id|>" }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" }}
{%- endif %}"""

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
QUESTION = "What is 12 + 34? Answer with only the number."


def template_folder(folder, template, where="jinja"):
    """A random model whose tokenizer transformers saved with `template` (None: no template), special tokens set.

    where="config": the template as tokenizer_config.json's `chat_template`, as older folders keep it.
    """
    from transformers import PreTrainedTokenizerFast

    write_hf_folder(folder)
    tok = char_tokenizer().tokenizer
    tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
                                 unk_token="<unk>", chat_template=template)
    hf.save_pretrained(folder)
    if where == "config":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = (folder / "chat_template.jinja").read_text()
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink()
    return folder


def hf_render(folder, messages):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)


@pytest.mark.parametrize("where", ["jinja", "config"])
@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("system", [None, "  Be brief.  "])
def test_template_equals_apply_chat_template(tmp_path, name, where, system):
    from transformers import PreTrainedTokenizerFast

    folder = template_folder(tmp_path / "m", TEMPLATES[name], where)
    _, tokenizer = load_pretrained(folder)
    ours = format_prompt(QUESTION, "template", system=system, tokenizer=tokenizer)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": QUESTION}]
    assert ours == hf_render(folder, messages)
    assert QUESTION in ours and ours != QUESTION
    assert ("careful assistant" in ours) == (name == "chatml" and system is None)  # the default system message
    hf = PreTrainedTokenizerFast.from_pretrained(folder)  # AutoTokenizer would rebuild a Qwen2 pre-tokenizer
    assert tokenizer.encode(ours) == hf.encode(ours, add_special_tokens=False)
    if name == "llama3":
        assert tokenizer.encode(ours)[0] == hf.convert_tokens_to_ids("<|begin_of_text|>")  # bos_token was rendered


def test_template_errors_are_one_line(tmp_path):
    from jinja2 import TemplateError

    folder = template_folder(tmp_path / "m", LLAMA3)
    _, tokenizer = load_pretrained(folder)
    messages = [{"role": "system", "content": "x"}, {"role": "tool", "content": "y"}]
    with pytest.raises(TemplateError, match="roles after the system message"):
        hf_render(folder, messages)
    with pytest.raises(InputError, match="roles after the system message") as e:
        tokenizer.render_chat(messages)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)

    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    _, broken = load_pretrained(folder)
    with pytest.raises(InputError, match="chat template fails"):
        format_prompt(QUESTION, "template", tokenizer=broken)


def test_a_folder_without_a_template_is_a_clear_error(tmp_path, capsys):
    folder = template_folder(tmp_path / "m", None)
    assert not (folder / "chat_template.jinja").exists()
    _, tokenizer = load_pretrained(folder)
    assert format_prompt(QUESTION, "chatml", tokenizer=tokenizer).endswith("<|im_start|>assistant\n")
    with pytest.raises(InputError, match="no chat template") as e:
        format_prompt(QUESTION, "template", tokenizer=tokenizer)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        format_prompt(QUESTION, "template")
    with pytest.raises(InputError, match="'plain', 'chatml', 'template'"):
        format_prompt(QUESTION, "alpaca")

    args = ["--model", str(folder), "--prompt-style", "template", "--digits", "2", "--n", "2", "--max-new-tokens", "2"]
    capsys.readouterr()
    assert evaluate_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no chat template" in err and err.count("\n") == 1


def test_evaluate_runs_with_the_template_style(tmp_path, capsys):
    folder = template_folder(tmp_path / "m", CHATML)
    args = ["--model", str(folder), "--prompt-style", "template", "--digits", "2", "--n", "3", "--max-new-tokens", "2"]
    assert evaluate_main(args) == 0
    assert "accuracy" in capsys.readouterr().out


def test_save_pretrained_keeps_the_template_and_special_tokens(tmp_path):
    folder = template_folder(tmp_path / "m", LLAMA3, where="config")
    model, tokenizer = load_pretrained(folder)
    save_pretrained(model, tokenizer, tmp_path / "copy")
    assert (tmp_path / "copy" / "chat_template.jinja").read_text() == LLAMA3
    _, again = load_pretrained(tmp_path / "copy")
    messages = [{"role": "user", "content": QUESTION}]
    want = format_prompt(QUESTION, "template", tokenizer=tokenizer)
    assert format_prompt(QUESTION, "template", tokenizer=again) == want == hf_render(tmp_path / "copy", messages)

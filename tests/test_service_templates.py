"""Chat templates rendered as Hugging Face renders them, from the GGUF."""

import pytest

from corral.service.templates import ChatTemplate, TemplateRenderError


def test_smollm2_template_from_the_gguf(vocab):
    t = ChatTemplate(vocab.chat_template())
    text = t.render([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")  # the template's own default system prompt
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_continuation_ends_inside_the_assistant_turn(vocab):
    t = ChatTemplate(vocab.chat_template())
    text = t.render_continuation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,"}])
    assert text.endswith("<|im_start|>assistant\nWell,")


def test_raise_exception_becomes_a_render_error():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateRenderError, match="roles must alternate"):
        t.render([])


def test_hf_helpers_are_available():
    t = ChatTemplate("{{ messages | tojson }}{{ bos_token }}", bos_token="<s>")
    assert t.render([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]<s>'

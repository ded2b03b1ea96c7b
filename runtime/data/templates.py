"""Named chat templates for base models that have none, and the choice between them.

Each is a Jinja chat template in the Hugging Face format, with `{% generation %}` markers around
what the assistant says, so transformers can return the assistant-token mask that SFT's
assistant-only loss needs. The end-of-turn marker sits inside the marked span: the model learns
to stop.
"""

from __future__ import annotations

from ..api.errors import UserError

_CHATML = (
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'assistant' -%}"
            "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
            "{%- else -%}"
            "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

TEMPLATES: dict[str, dict[str, str]] = {
    "chatml": {"template": _CHATML, "stop": "<|im_end|>"},
    # chatml with Qwen's default system prompt when the conversation brings none
    "qwen": {
        "template": (
            "{%- if messages[0]['role'] != 'system' -%}"
            "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
            "{%- endif -%}" + _CHATML
        ),
        "stop": "<|im_end|>",
    },
    "llama3": {
        "template": (
            "{{ bos_token }}"
            "{%- for m in messages -%}"
            "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
            "{%- if m['role'] == 'assistant' -%}"
            "{% generation %}{{ m['content'] + '<|eot_id|>' }}{% endgeneration %}"
            "{%- else -%}"
            "{{ m['content'] + '<|eot_id|>' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
        ),
        "stop": "<|eot_id|>",
    },
    "alpaca": {
        "template": (
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'system' -%}{{ m['content'] + '\n\n' }}"
            "{%- elif m['role'] == 'assistant' -%}"
            "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\n\n' }}"
            "{%- else -%}{{ '### Instruction:\n' + m['content'] + '\n\n### Response:\n' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        ),
        "stop": "",
    },
    "gemma": {
        "template": (
            "{{ bos_token }}"
            "{%- for m in messages -%}"
            "{%- set role = 'model' if m['role'] == 'assistant' else 'user' -%}"
            "{%- if m['role'] == 'assistant' -%}"
            "{{ '<start_of_turn>model\n' }}{% generation %}{{ m['content'] + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}"
            "{%- else -%}"
            "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
        ),
        "stop": "<end_of_turn>",
    },
    "mistral": {
        "template": (
            "{{ bos_token }}"
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'assistant' -%}"
            "{% generation %}{{ ' ' + m['content'] + eos_token }}{% endgeneration %}"
            "{%- elif m['role'] == 'system' -%}{{ '[INST] ' + m['content'] + '\n\n' }}"
            "{%- else -%}{{ ('' if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system' else '[INST] ') + m['content'] + ' [/INST]' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        ),
        "stop": "",
    },
    "phi3": {
        "template": (
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'assistant' -%}"
            "{{ '<|assistant|>\n' }}{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
            "{%- else -%}"
            "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
        ),
        "stop": "<|end|>",
    },
}


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%- generation %}", "{% generation %}")


def apply_template(tokenizer, name: str | None, source: str = "the model") -> None:
    """Give `tokenizer` the named template, or check it has one of its own."""
    if name is not None:
        if name not in TEMPLATES:
            raise UserError(f"unknown template {name!r}; valid: {', '.join(TEMPLATES)}", "spec.template")
        tokenizer.chat_template = TEMPLATES[name]["template"]
        stop = TEMPLATES[name]["stop"]
        if stop and stop in tokenizer.get_vocab():
            tokenizer.eos_token = stop
        return
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source} has no chat template of its own; set spec.template to one of: {', '.join(TEMPLATES)}",
            "spec.template",
        )

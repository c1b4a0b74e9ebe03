#!/usr/bin/env python3
"""Write the chat-template fixture: a few chat templates in the styles models ship (plain role
prefixes, Llama-3-like headers, [INST] turns that must alternate, ChatML-like with loop
controls), conversations, and what Jinja2 renders for them in the environment Hugging Face
transformers renders chat templates in (sandboxed, trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, bos/eos tokens as variables). bitsvf's rendering must give the same text.

    pip install jinja2
    python3 scripts/reference/render_chat_templates.py tests/fixtures/chat-templates
"""
import json
import os
import sys

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

out = sys.argv[1]
os.makedirs(out, exist_ok=True)


def raise_exception(message):
    raise TemplateError(message)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                    extensions=["jinja2.ext.loopcontrols"])
env.globals["raise_exception"] = raise_exception

TEMPLATES = {
    "roles": (
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] | trim + '<|eot_id|>' }}"
        "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] | trim + '<|eot_id|>' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] | trim + '<|eot_id|>' }}"
        "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    ),
    "headers": """{%- set loop_messages = messages %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
{%- endif %}
{{- bos_token }}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}
{%- for message in loop_messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
""",
    "alternating": """{% if messages[0]['role'] == 'system' %}
    {% set offset = 1 %}
    {% set prefix = messages[0]['content'].strip() + '\\n\\n' %}
{% else %}
    {% set offset = 0 %}
    {% set prefix = '' %}
{% endif %}
{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages[offset:] %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% set ns.turns = ns.turns + 1 %}
        {{ '[INST] ' + (prefix if loop.first else '') + message['content'].strip() + ' [/INST]' }}
    {% elif message['content'].startswith(' ') %}
        {{ message['content'][1:] + eos_token }}
    {% else %}
        {{ message['content'] + eos_token }}
    {% endif %}
{% endfor %}
{{ '(turns: ' ~ ns.turns ~ ')' if add_generation_prompt else '' }}
""",
    "chatml": """{% for message in messages %}
{% if message.role == 'tool' %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% if loop.last and message.role == 'user' and messages | length > 2 %}{# long conversation #}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}""",
}

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "Sort: pear apple fig"}],
    "system_and_turns": [
        {"role": "system", "content": "  Answer briefly.  "},
        {"role": "user", "content": "What is 12+34?"},
        {"role": "assistant", "content": " 46"},
        {"role": "user", "content": "And naïve café 東京?\n"},
    ],
    "not_alternating": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ],
    "with_tool": [
        {"role": "user", "content": "weather?"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
}

cases = []
for tname, template in TEMPLATES.items():
    for cname, messages in CONVERSATIONS.items():
        for gen in (True, False):
            case = {"template": tname, "conversation": cname, "add_generation_prompt": gen}
            try:
                case["expected"] = env.from_string(template).render(
                    messages=messages, add_generation_prompt=gen,
                    bos_token="<|begin_of_text|>", eos_token="</s>")
            except TemplateError as e:
                case["error"] = str(e)
            cases.append(case)

with open(os.path.join(out, "cases.json"), "w") as f:
    json.dump({"templates": TEMPLATES, "conversations": CONVERSATIONS, "bos_token": "<|begin_of_text|>",
               "eos_token": "</s>", "cases": cases}, f, ensure_ascii=False, indent=1)
print(f"wrote {len(cases)} cases to {out}")

"""Writes the eval sets shipped in evals/ (docs/ROUTING.md, *Evaluating tiers*): support-ticket
classification and structured extraction, each written here from templates (licence-clean), with
slices for the edge cases. Deterministic: the same files on every run.

    .venv/bin/python scripts/make_eval_sets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "evals"
LABELS = ["refund", "shipping", "billing", "technical", "account"]

TICKETS = {
    "refund": [
        "I returned the {item} two weeks ago and still have not received my money back.",
        "The {item} arrived broken. I want a refund, not a replacement.",
        "Please cancel my order of the {item} and give me my money back.",
        "I was promised a refund for the {item} but nothing has happened.",
    ],
    "shipping": [
        "My {item} was supposed to arrive on Monday and the tracking has not moved since.",
        "The parcel with my {item} was delivered to the wrong address.",
        "How long does delivery of the {item} to Norway usually take?",
        "The courier left my {item} outside in the rain without ringing.",
    ],
    "billing": [
        "I was charged twice for the {item} on my credit card statement.",
        "The invoice for my {item} shows the wrong VAT number.",
        "Why did my monthly subscription price go up without notice?",
        "My card was charged for a {item} I never ordered.",
    ],
    "technical": [
        "The {item} will not turn on after the latest firmware update.",
        "The app crashes every time I try to pair it with my {item}.",
        "My {item} keeps disconnecting from the wifi every few minutes.",
        "The screen of the {item} flickers when the brightness is low.",
    ],
    "account": [
        "I cannot log in to my account; the password reset email never arrives.",
        "Please change the email address on my account to my new one.",
        "I want to delete my account and all the data you hold about me.",
        "Someone else seems to have logged in to my account from another country.",
    ],
}
ITEMS = [
    "headphones",
    "coffee machine",
    "desk lamp",
    "smart watch",
    "blender",
    "router",
    "e-reader",
    "camera",
]
FILLER = [
    "I have been a customer for many years and have always been happy with your service until now.",
    "I already tried calling the hotline twice but nobody picked up the phone.",
    "My neighbour ordered the same thing last month and had no problems at all.",
    "I am writing from my phone so please excuse any typos in this message.",
    "This is really frustrating because I needed it for a family event this weekend.",
]
AMBIGUOUS = [
    ("refund", "shipping", "The {item} never arrived, so I want my money back rather than a new delivery."),
    ("billing", "refund", "I was charged for the {item} twice; please refund the second charge."),
    (
        "technical",
        "refund",
        "The {item} stopped working after a day. Can you fix it or should I send it back?",
    ),
    ("account", "billing", "I cannot see my invoices for the {item} because my account is locked."),
]

NAMES = [
    "John Smith",
    "Maria Garcia",
    "Wei Chen",
    "Aisha Khan",
    "Lars Nilsen",
    "Emma Dubois",
    "Kofi Mensah",
    "Yuki Tanaka",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def classification(rng: random.Random) -> list[dict]:
    instruction = (
        "Classify this customer support ticket into exactly one of these labels: "
        + ", ".join(LABELS)
        + ". Reply with the label only.\n\nTicket: "
    )
    out = []
    for label, templates in TICKETS.items():
        for template in templates:
            for item in rng.sample(ITEMS, 4):  # four different items per template: no duplicates
                text = template.format(item=item) + f" Order number {rng.randint(10000, 99999)}."
                kind = rng.random()
                if kind < 0.3:
                    slice_ = "long-input"
                    text = (
                        " ".join(rng.sample(FILLER, 3)) + " " + text + " " + " ".join(rng.sample(FILLER, 2))
                    )
                else:
                    slice_ = "plain"
                out.append({"prompt": instruction + text, "expected": label, "slice": slice_})
    for primary, _other, template in AMBIGUOUS:
        for item in rng.sample(ITEMS, 6):
            out.append({"prompt": instruction + template.format(item=item), "expected": primary,
                        "slice": "ambiguous"})  # fmt: skip
    rng.shuffle(out)
    for i, example in enumerate(out):
        example.update({"id": f"ticket-{i:03d}", "scorer": "label", "labels": LABELS})
    return out


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": ["string", "null"]}, "amount": {"type": ["number", "null"]},
                   "date": {"type": ["string", "null"]}},
    "required": ["name", "amount", "date"],
}  # fmt: skip


def extraction(rng: random.Random) -> list[dict]:
    instruction = (
        "Extract the customer's name, the order amount in euros and the order date from the message below. "
        'Reply with JSON only, with the keys "name", "amount" (a number) and "date" (YYYY-MM-DD); '
        "use null for anything the message does not say.\n\nMessage: "
    )
    out = []
    for i in range(108):
        name = rng.choice(NAMES)
        amount = round(rng.uniform(5, 900), 2) if rng.random() < 0.5 else rng.randint(5, 900)
        day, month = rng.randint(1, 28), rng.randint(1, 12)
        date = f"2026-{month:02d}-{day:02d}"
        spoken = f"{MONTHS[month - 1]} {day}, 2026"
        kind = i % 4
        if kind == 3:  # a field is missing
            missing = rng.choice(["amount", "date"])
            text = (f"Hello, this is {name}. I placed an order on {spoken} but it has not shipped yet."
                    if missing == "amount" else f"Hi, {name} here. I paid €{amount} for my order and it has not arrived.")  # fmt: skip
            expected = {
                "name": name,
                "amount": None if missing == "amount" else amount,
                "date": None if missing == "date" else date,
            }
            slice_ = "missing-field"
        else:
            text = f"Hi, my name is {name}. On {spoken} I ordered a {rng.choice(ITEMS)} for €{amount} and I have a question."
            expected = {"name": name, "amount": amount, "date": date}
            slice_ = "plain"
            if kind == 2:
                text = " ".join(rng.sample(FILLER, 3)) + " " + text + " " + " ".join(rng.sample(FILLER, 2))
                slice_ = "long-input"
        out.append({"id": f"extract-{i:03d}", "prompt": instruction + text, "expected": expected, "slice": slice_,
                    "scorer": "json_fields", "json_schema": SCHEMA})  # fmt: skip
    return out


VARIANTS = {
    "careful": "Read the task carefully and answer exactly in the format it asks for, with nothing else.\n\n{input}",
    "one-word": "Answer with a single word from the list, nothing else.\n\n{input}",
    "json-example": '{input}\n\nAn answer looks like this: {"name": "Ann Lee", "amount": 12.5, "date": "2026-03-04"}',
}


def main() -> None:
    ROOT.mkdir(exist_ok=True)
    (ROOT / "variants").mkdir(exist_ok=True)
    for name, make in (("support_tickets", classification), ("extraction", extraction)):
        examples = make(random.Random(name))
        (ROOT / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
        print(f"evals/{name}.jsonl: {len(examples)} examples")
    for name, text in VARIANTS.items():
        (ROOT / "variants" / f"{name}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()

"""The constrained workload of `specdec bench --json-schema` (and `benches/structured_output.py`):
extraction requests written here - a sentence about a person, and the instruction to return their
name, age and city as JSON - with the schema the answers are constrained to. No third-party text."""

from __future__ import annotations

EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
EXTRACTION_TEXTS = [
    "John Smith is 31 and lives in Boston.",
    "Maria Lopez, 45, moved to Madrid last spring.",
    "At 27, Chen Wei already runs a bakery in Shanghai.",
    "Our neighbour Tom Baker (62) has lived in Leeds all his life.",
    "Aisha Khan is a 38-year-old doctor from Lahore.",
    "The winner, 19-year-old Lucas Martin of Lyon, took the prize.",
    "Olga Petrova celebrated her 50th birthday at home in Kazan.",
    "Kenji Sato, aged 23, studies in Osaka.",
    "Fatima Diallo is 34; she teaches in Dakar.",
    "Peter Novak, 71, retired to Brno.",
    "Sofia Rossi (29) works as an architect in Milan.",
    "David Cohen is 40 and commutes to Haifa.",
]


def extraction_instructions() -> list[str]:
    """The workload's user turns, one per text."""
    return [f"Extract the name, age and city as JSON: {text}" for text in EXTRACTION_TEXTS]

"""The demo's built-in preference set: concise answers preferred over padded, verbose ones.

Small and hand-checkable on purpose: every chosen answer is a short correct fact, every rejected one
is the same fact wrapped in filler, so after DPO the model should answer more briefly.
"""

from __future__ import annotations

FACTS: list[tuple[str, str, str]] = [
    ("What is the capital of France?", "Paris.", "the capital of France is Paris"),
    ("What is the capital of Japan?", "Tokyo.", "the capital of Japan is Tokyo"),
    ("What is the capital of Italy?", "Rome.", "the capital of Italy is Rome"),
    ("What is the capital of Spain?", "Madrid.", "the capital of Spain is Madrid"),
    ("What is the capital of Germany?", "Berlin.", "the capital of Germany is Berlin"),
    ("What is the capital of Canada?", "Ottawa.", "the capital of Canada is Ottawa"),
    ("What is the capital of Egypt?", "Cairo.", "the capital of Egypt is Cairo"),
    ("What is the capital of Kenya?", "Nairobi.", "the capital of Kenya is Nairobi"),
    ("What is the capital of Peru?", "Lima.", "the capital of Peru is Lima"),
    ("What is the capital of Norway?", "Oslo.", "the capital of Norway is Oslo"),
    ("How many days are in a week?", "Seven.", "a week has seven days"),
    ("How many legs does a spider have?", "Eight.", "a spider has eight legs"),
    ("How many continents are there?", "Seven.", "there are seven continents"),
    ("What is 2 + 2?", "4.", "2 + 2 equals 4"),
    ("What is 3 times 3?", "9.", "3 times 3 is 9"),
    ("What is 10 minus 4?", "6.", "10 minus 4 is 6"),
    ("What is 12 divided by 3?", "4.", "12 divided by 3 is 4"),
    ("What color is the sky on a clear day?", "Blue.", "the sky on a clear day is blue"),
    ("What is the largest planet in our solar system?", "Jupiter.", "the largest planet is Jupiter"),
    ("What is the closest star to Earth?", "The Sun.", "the closest star to Earth is the Sun"),
    ("What gas do plants absorb from the air?", "Carbon dioxide.", "plants absorb carbon dioxide"),
    ("What is the boiling point of water at sea level in Celsius?", "100 °C.",
     "water boils at 100 degrees Celsius at sea level"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare.", "Romeo and Juliet was written by William Shakespeare"),
    ("What is the chemical symbol for gold?", "Au.", "the chemical symbol for gold is Au"),
    ("What is the freezing point of water in Celsius?", "0 °C.", "water freezes at 0 degrees Celsius"),
    ("How many hours are in a day?", "24.", "a day has 24 hours"),
    ("What is the square root of 16?", "4.", "the square root of 16 is 4"),
    ("Which ocean is the largest?", "The Pacific Ocean.", "the largest ocean is the Pacific Ocean"),
    ("What language is spoken in Brazil?", "Portuguese.", "people in Brazil speak Portuguese"),
    ("How many sides does a triangle have?", "Three.", "a triangle has three sides"),
    ("What is the opposite of hot?", "Cold.", "the opposite of hot is cold"),
    ("What do bees make?", "Honey.", "bees make honey"),
    ("What is the capital of Australia?", "Canberra.", "the capital of Australia is Canberra"),
    ("What is the capital of Greece?", "Athens.", "the capital of Greece is Athens"),
    ("How many minutes are in an hour?", "60.", "an hour has 60 minutes"),
    ("What is 5 times 6?", "30.", "5 times 6 is 30"),
    ("What planet is known as the Red Planet?", "Mars.", "Mars is known as the Red Planet"),
    ("What is the tallest animal?", "The giraffe.", "the tallest animal is the giraffe"),
    ("How many months are in a year?", "Twelve.", "a year has twelve months"),
    ("What is H2O commonly called?", "Water.", "H2O is commonly called water"),
]

_OPENERS = [
    "That's a great question, and I'm happy to help you with it! ",
    "Thank you so much for asking. Let me explain this carefully and in detail. ",
    "Great question! Many people wonder about this, so let me walk you through it. ",
    "Certainly! I'd be delighted to answer that for you. ",
]
_CLOSERS = [
    " I hope this explanation was helpful, and please feel free to ask if you have any more questions!",
    " Let me know if you would like any further details or additional background on this topic.",
    " It's a fascinating subject, and there is always more to learn about it if you are curious!",
    " I hope that clears things up for you. Have a wonderful day!",
]


def verbose(sentence: str, i: int) -> str:
    text = sentence[0].upper() + sentence[1:]
    return f"{_OPENERS[i % len(_OPENERS)]}To put it simply, {sentence}. {text}.{_CLOSERS[i % len(_CLOSERS)]}"


def preference_rows() -> list[dict[str, object]]:
    """OpenAI's preference format, so the demo also shows that format end to end."""
    return [
        {"input": {"messages": [{"role": "user", "content": q}]},
         "preferred_output": [{"role": "assistant", "content": short}],
         "non_preferred_output": [{"role": "assistant", "content": verbose(sentence, i)}]}
        for i, (q, short, sentence) in enumerate(FACTS)
    ]


HELD_OUT_PROMPTS = [
    "What is the capital of Portugal?",
    "How many wheels does a bicycle have?",
    "What is 7 plus 8?",
]


# --------------------------------------------------------------------------- the retention probe

#: Short factual questions SmolLM2-135M-Instruct answers right before any training (greedy, 32 new
#: tokens, graded by :data:`RETENTION_GRADER`): 20 kept of 32 candidates, checked on the base converted
#: from the shipped GGUF. None of them is a training question of this set or of ``bench/data.py``.
RETENTION_FACTS: list[tuple[str, str]] = [
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of South Korea?", "Seoul"),
    ("What is the capital of the Netherlands?", "Amsterdam"),
    ("Who painted the Mona Lisa?", "Leonardo"),
    ("Who developed the theory of relativity?", "Einstein"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the longest river in Africa?", "Nile"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("What is the largest mammal?", "whale"),
    ("What is the main language spoken in Mexico?", "Spanish"),
    ("What is the currency of Japan?", "yen"),
    ("What is the currency of the United Kingdom?", "pound"),
    ("What gas do humans need to breathe to survive?", "oxygen"),
    ("Who wrote the play Hamlet?", "Shakespeare"),
    ("What is the largest desert in the world?", "Sahara"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("What force pulls objects toward the Earth?", "gravity"),
]

#: the answer must appear in the greedy output, case-insensitively
RETENTION_GRADER: dict[str, object] = {"type": "string_check", "name": "fact", "operation": "ilike",
                                       "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}


def retention_rows() -> list[dict[str, object]]:
    """The probe in the reinforcement format: ``messages`` ending in a user turn, the answer beside it."""
    return [{"messages": [{"role": "user", "content": q}], "answer": a} for q, a in RETENTION_FACTS]

"""Two story attributes for the stories260k replication, as `module:function` scorers.

Each scorer has the reward-callable signature `fn(prompts, responses) -> list[float]` and reads
only the response (the story continuation), so the score says what the model wrote, not what
the opening already said. Run `ctrlsafe` with PYTHONPATH set to this folder so that
`--rm sentiment=scorers:sentiment` imports.

- sentiment: (positive words - negative words) per 100 words, from the word lists below. These
  are the feeling words TinyStories uses most ("happy", "smiled", "sad", "cried", "scared").
- dialogue: percentage of words inside double quotes, i.e. how much of the story is speech.
  An unclosed quote at the end (a cut-off story) counts up to the end.

The two are partly independent: a story can be happy with or without speech, but stories that
talk a lot also tend to say "thank you" and "sorry", so some leakage is expected.
"""
from __future__ import annotations

import re

POSITIVE = frozenset("""
happy happily glad joy joyful fun love loved loves lovely like liked likes smile smiled smiles
smiling laugh laughed laughing good great nice kind friend friends friendly best beautiful
pretty fine safe proud excited enjoy enjoyed play played playing hug hugged thank thanks yay
wonderful amazing special cheerful warm gentle helpful help helped helps share shared sharing
together sweet cool brave bright calm thankful delicious favorite yummy
""".split())

NEGATIVE = frozenset("""
sad sadly cry cried cries crying tear tears angry mad scared scary afraid fear bad hurt hurts
sorry sick lost alone lonely upset broke broken break bored boring mean naughty worried worry
fight fought yell yelled shout shouted ouch pain dark danger dangerous ugly hate hated fell
fall frown frowned sob sobbed grumpy stuck tired hungry monster bully trouble mess messy
""".split())

_WORD = re.compile(r"[a-z']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentiment(prompts: list, responses: list[str]) -> list[float]:
    """(positive - negative) words per 100 words of the response; 0 for an empty response."""
    out = []
    for text in responses:
        words = _words(text)
        pos = sum(w in POSITIVE for w in words)
        neg = sum(w in NEGATIVE for w in words)
        out.append(100.0 * (pos - neg) / len(words) if words else 0.0)
    return out


def dialogue(prompts: list, responses: list[str]) -> list[float]:
    """Percentage of the response's words that sit inside double quotes."""
    out = []
    for text in responses:
        quoted = 0
        total = 0
        for i, part in enumerate(text.split('"')):
            n = len(_words(part))
            total += n
            quoted += n if i % 2 == 1 else 0  # odd parts are between an opening and a closing quote
        out.append(100.0 * quoted / total if total else 0.0)
    return out

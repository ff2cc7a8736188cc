"""The real-model task: controlled positive sentiment (DPO §6.1) on review prompts, as data.

Prompts ask for a short review of a product, a film, a place or a meal. They are built
combinatorially from the lists below (item × context × phrasing), and split by ITEM, so no
held-out prompt names an item seen in training. Everything is deterministic given the seed.

The reward is VADER's compound score of the reply (an offline lexicon, in [-1, 1]); preference
pairs are the best and the worst of the reference model's own samples for a prompt, as in DPO §6.1.
"""

from __future__ import annotations

import random

SYSTEM = "You write short reviews."

ITEMS = {
    "product": ["wireless earbuds", "coffee grinder", "hiking backpack", "electric kettle", "desk lamp", "yoga mat",
                "phone case", "blender", "rain jacket", "office chair", "board game", "water bottle"],
    "film": ["the film The Silent Harbor", "the film Northern Lights", "the film The Last Orchard", "the film Paper Moons",
             "the film Glass City", "the film The Long Winter", "the documentary Deep Currents", "the film Borrowed Time",
             "the animated film Tin Garden", "the thriller Night Ferry", "the comedy Second Helpings",
             "the western Dust and Iron"],
    "place": ["hotel near the train station", "city museum", "campsite by the lake", "botanical garden", "old bookshop",
              "ski resort", "seaside guesthouse", "science centre", "public library", "night market", "climbing gym",
              "railway museum"],
    "food": ["ramen shop on Elm Street", "bakery downtown", "vegan burger place", "Thai curry house", "pizza place by the harbour",
             "taco truck", "sushi bar", "pancake house", "ice cream parlour", "Greek taverna", "dumpling stall",
             "steakhouse on the corner"],
}
CONTEXTS = {
    "product": ["I bought last month", "my sister gave me", "I ordered online", "I have used for a week", "I got on sale"],
    "film": ["I watched last night", "I saw at the cinema", "we streamed on Friday", "I watched on a long flight",
             "my friends recommended"],
    "place": ["we visited in May", "I went to last weekend", "we tried on our holiday", "I visited with my parents",
              "I went to on a rainy day"],
    "food": ["we tried for dinner", "I went to for lunch", "we ordered from on Sunday", "I visited with friends",
             "I tried after work"],
}
PHRASINGS = ["Write a short review of the {x}.", "Review the {x} in two sentences.", "Tell me what you thought of the {x}."]
HELD_OUT_ITEMS = 3  # per category: 3 of 12 items never appear in training prompts


def _prompts(items: dict[str, list[str]]) -> list[str]:
    return [p.format(x=f"{item} {context}").replace("the the ", "the ")
            for cat, names in items.items() for item in names for context in CONTEXTS[cat] for p in PHRASINGS]


def prompts(n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), disjoint by item, shuffled with `seed`."""
    rng = random.Random(f"real-prompts-{seed}")
    train_items, eval_items = {}, {}
    for cat, names in ITEMS.items():
        names = names[:]
        rng.shuffle(names)
        eval_items[cat], train_items[cat] = names[:HELD_OUT_ITEMS], names[HELD_OUT_ITEMS:]
    train, held_out = _prompts(train_items), _prompts(eval_items)
    for name, pool, n in (("train", train, n_train), ("held-out", held_out, n_eval)):
        if not 1 <= n <= len(pool):
            raise ValueError(f"{name} prompts must be between 1 and {len(pool)}; got {n}")
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train[:n_train], held_out[:n_eval]


def messages(prompt: str) -> list[dict]:
    """One user turn after a short system prompt (SmolLM2's template would otherwise add its
    default one, which is longer and makes every forward pass slower)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def vader():
    """VADER's analyser, or one line naming the extra to install."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ValueError("the real-model demo scores sentiment with VADER: pip install 'aligndial[real]' "
                         "(or pip install vaderSentiment)") from None
    return SentimentIntensityAnalyzer()


def rewards(texts: list[str], analyser=None) -> list[float]:
    """VADER compound score of each text, in [-1, 1]."""
    analyser = analyser or vader()
    return [analyser.polarity_scores(t)["compound"] for t in texts]


def preference_pairs(samples: list[dict], min_gap: float) -> list[dict]:
    """Best against worst sample per prompt (rows: prompt, text, reward), in TRL's conversational
    preference format; prompts whose best and worst differ by less than `min_gap` are dropped
    (ties carry no preference). Among equal rewards the earlier sample ranks higher."""
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s)
    pairs = []
    for prompt, rows in by_prompt.items():
        ranked = sorted(range(len(rows)), key=lambda i: (-rows[i]["reward"], i))
        best, worst = rows[ranked[0]], rows[ranked[-1]]
        if len(rows) < 2 or best["reward"] - worst["reward"] < min_gap or best["text"] == worst["text"]:
            continue
        pairs.append({"prompt": messages(prompt), "chosen": [{"role": "assistant", "content": best["text"]}],
                      "rejected": [{"role": "assistant", "content": worst["text"]}],
                      "reward_chosen": best["reward"], "reward_rejected": worst["reward"]})
    return pairs


def distinct_2(replies: list[list[int]]) -> float:
    """Distinct bigrams over all bigrams of the replies' tokens (Li et al. 2016); 0 without bigrams."""
    grams = [tuple(r[i : i + 2]) for r in replies for i in range(len(r) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0

"""Seeded TL;DR-shaped examples for the offline quick start and the tests.

Built for the quick start's two conflicting rewards, relevance (embedding similarity of the summary to the post)
and brevity (fewer words). Each post (3-4 sentences, ~30-60 words, ASCII) is about one problem in one of ten
subreddits: a *thing* ("sourdough bread") has a *problem* ("burns on the bottom"), two *fixes* were tried, for a
*duration*. The reference summary takes the first 1-5 of these chunks, in order of topical weight::

    sourdough bread | burns on the bottom | , tried lower oven heat | and a cast iron pan | for two weeks

so references run from 2 to ~15 words (18 at most), every word of a reference appears in its post, and a longer
summary carries more of the post's topical content: a policy warm-started on them writes a spread of lengths, and
relevance pulls against brevity.

Plain Python on purpose: the data package serves these examples through
:class:`~clp_lightning.data.synthetic.SyntheticTLDRDataModule`, and :mod:`clp_lightning.models` trains the
``synthetic-bpe`` tokenizer on them, so model loading does not depend on the data package (or on Lightning).
"""

from __future__ import annotations

import random

# subreddit -> (things, problems, fixes, context sentences); a thing takes its problem as "my {thing} {problem}".
TOPICS: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "cooking": (
        ["sourdough bread", "chicken curry", "tomato sauce", "pizza dough", "beef stew", "banana bread",
         "fried rice", "lentil soup"],
        ["burns on the bottom", "tastes too salty", "comes out dry", "falls apart", "turns out bland",
         "never rises properly"],
        ["lower oven heat", "fresh garlic", "more olive oil", "a cast iron pan", "less salt", "a longer rest"],
        ["I cook dinner most nights for my family and usually follow recipes pretty closely.",
         "Cooking is my main hobby and I really want to get this dish right."],
    ),
    "relationships": (
        ["new boyfriend", "best friend", "older sister", "new girlfriend", "new roommate", "close coworker",
         "younger brother", "old friend"],
        ["never texts me back", "forgot my birthday", "keeps canceling our plans", "wants to move in",
         "lies about small things", "ignores me at parties"],
        ["talking calmly", "giving more space", "couples counseling", "writing a letter", "a weekend trip",
         "setting clear boundaries"],
        ["We have known each other for years and things were great at first.",
         "I really care about this person but I am starting to feel ignored."],
    ),
    "personalfinance": (
        ["credit card", "student loan", "car loan", "emergency fund", "monthly budget", "retirement account",
         "rent payment", "savings account"],
        ["keeps growing every month", "has a huge interest rate", "is always empty", "is falling behind",
         "costs too much", "got frozen last week"],
        ["a spending tracker", "a side job", "a balance transfer", "cooking at home", "cutting subscriptions",
         "a debt snowball"],
        ["I make a decent salary but somehow I never have money left at the end.",
         "I am trying to get my finances in order before I turn thirty."],
    ),
    "running": (
        ["left knee", "marathon training", "morning run", "race pace", "running shoes", "long run", "right ankle",
         "tempo run"],
        ["hurts after five miles", "feels harder every week", "keeps getting slower", "gives me blisters",
         "stalls at ten miles", "feels really heavy"],
        ["foam rolling", "new insoles", "slower easy runs", "more sleep", "strength training", "shorter strides"],
        ["I run about four times a week and I am training for my first race.",
         "I started running last year to get healthier and I really love it."],
    ),
    "gaming": (
        ["gaming laptop", "new console", "ranked matchmaking", "graphics card", "online lobby", "save file",
         "wireless controller", "game server"],
        ["crashes every hour", "keeps disconnecting randomly", "drops frames constantly", "got corrupted yesterday",
         "lags during fights", "overheats after an hour"],
        ["updating drivers", "a cooling pad", "lower graphics settings", "a wired connection",
         "reinstalling the game", "clearing the cache"],
        ["I play mostly on weekends with a group of friends from college.",
         "I saved for months to buy this setup so this is really frustrating."],
    ),
    "fitness": (
        ["bench press", "squat form", "protein intake", "gym routine", "lower back", "pull up", "weight loss",
         "deadlift form"],
        ["stopped improving completely", "feels off lately", "plateaued for months", "makes my shoulder ache",
         "goes nowhere", "hurts during warmups"],
        ["lighter weights", "a personal trainer", "more rest days", "filming my sets", "a meal plan",
         "mobility drills"],
        ["I lift four days a week and I try to eat enough protein every day.",
         "I have been going to the gym for about a year now and love it."],
    ),
    "gardening": (
        ["tomato plants", "basil pots", "apple trees", "strawberry beds", "rose bushes", "grass seeds",
         "pepper seedlings", "potted herbs"],
        ["keep turning yellow", "wilt every afternoon", "got eaten by slugs", "stopped growing", "have brown spots",
         "never flower"],
        ["less water", "organic fertilizer", "more sunlight", "copper tape", "fresh compost", "neem oil"],
        ["This is my second season growing things in my small backyard.",
         "I water every morning and the spot gets a few hours of sun."],
    ),
    "cars": (
        ["old sedan", "car battery", "front brake", "engine light", "car radio", "gear shift", "steering wheel",
         "car heater"],
        ["makes a grinding noise", "dies every morning", "shakes at high speed", "smells like burning",
         "stopped working suddenly", "leaks something green"],
        ["a new battery", "an oil change", "a local mechanic", "new spark plugs", "a code reader",
         "cleaning the terminals"],
        ["The car has about ninety thousand miles and I drive it to work daily.",
         "I cannot really afford a new car right now so I want to fix this one."],
    ),
    "cats": (
        ["older cat", "rescue kitten", "orange cat", "shy cat", "new kitten", "senior cat", "black cat",
         "indoor cat"],
        ["pees outside the box", "scratches the couch", "cries all night", "stopped eating dry food",
         "bites my hands", "hides under the bed"],
        ["a second litter box", "a scratching post", "a feeding schedule", "calming spray", "more playtime",
         "a vet visit"],
        ["I adopted this cat from a shelter a few months ago and she was fine.",
         "I love this cat but I am running out of ideas and patience."],
    ),
    "travel": (
        ["Japan trip", "flight booking", "hotel reservation", "travel budget", "train pass", "Europe itinerary",
         "passport renewal", "road trip"],
        ["got canceled last minute", "costs way too much", "is way behind schedule", "has no refund option",
         "feels too rushed", "got double charged"],
        ["calling the airline", "a travel agent", "budget hostels", "a refund request", "fewer cities",
         "travel insurance"],
        ["This is my first big trip abroad and I planned it for months.",
         "I am traveling with two friends and we are on a tight budget."],
    ),
}
DURATIONS = ["ten days", "two weeks", "three weeks", "a month", "two months", "six months", "a year"]
PEOPLE = ["roommate", "sister", "partner", "best friend", "dad", "coworker"]
ASKS = ["Any advice would be appreciated.", "What should I do next?", "Has anyone dealt with this before?",
        "What am I doing wrong here?"]
OPENINGS = [
    "For {duration} my {thing} {problem}.",
    "My {thing} {problem} and it has been like this for {duration}.",
    "I need help because my {thing} {problem}, and it has gone on for {duration}.",
]
ATTEMPTS = [
    "I tried {fix1} and {fix2} but nothing really helped.",
    "So far I tried {fix1} and {fix2}, with no luck at all.",
    "I already tried {fix1} and {fix2} and it did not change anything.",
]
TITLES = ["{Thing} {problem}", "Help with my {thing}", "{Thing} problem, need advice", "My {thing} {problem}"]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def generate_examples(n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """``n`` synthetic TL;DR examples in the raw schema (``subreddit``, ``title``, ``post``, ``summary``, ``id``).

    Args:
        n: Number of examples.
        seed: Same seed (and split) -> same examples.
        split: Name mixed into the seed and the ids, so that splits draw different examples.
    """
    rng = random.Random(f"{seed}/{split}")  # str seeds hash with sha512: stable across processes
    examples = []
    for i in range(n):
        subreddit = rng.choice(sorted(TOPICS))
        things, problems, fixes, contexts = TOPICS[subreddit]
        slots = {
            "thing": rng.choice(things),
            "problem": rng.choice(problems),
            "duration": rng.choice(DURATIONS),
        }
        slots["fix1"], slots["fix2"] = rng.sample(fixes, 2)
        slots["Thing"] = _capitalize(slots["thing"])
        middle = [rng.choice(ATTEMPTS).format(**slots), rng.choice(contexts)]
        rng.shuffle(middle)
        extra = rng.choice([[], [f"My {rng.choice(PEOPLE)} thinks I am overthinking it, but it really bothers me."],
                            [rng.choice(ASKS)]])
        post = " ".join([rng.choice(OPENINGS).format(**slots), *middle, *extra])
        chunks = [slots["thing"], slots["problem"], f", tried {slots['fix1']}", f"and {slots['fix2']}",
                  f"for {slots['duration']}"]
        summary = " ".join(chunks[: rng.randint(1, len(chunks))]).replace(" ,", ",")
        examples.append({
            "subreddit": subreddit,
            "title": rng.choice(TITLES).format(**slots),
            "post": post,
            "summary": summary,
            "id": f"synthetic-{split}-{i}",
        })
    return examples

"""The demo's built-in world: seeded fictional people, their biographies, and every file the demo
trains and evaluates on. Nothing is downloaded; the same seed gives byte-identical files.

Each person has a first and a last name from shared pools (each piece one token) and six
attributes whose values come from closed pools (20-24 values each), so the true value can be
ranked against the other values of the attribute: a smooth knowledge signal next to exact match.

Two populations:
  known  - their biographies are in the base model's pretraining text. For `qa_fraction` of
           them, the pretraining text also holds plain-text Q/A ("user ... assistant ...") and the chat
           data holds chat Q/A. The rest ("held-out known") have no Q/A anywhere: asking them
           in chat tests whether extraction generalises at all in this world.
  new    - their biographies are only in the raw corpus (raw.jsonl). Asking them in chat after
           the transplant is the question the demo exists to answer.

Biographies vary sentence templates (7 per attribute) and sentence order, and there are many
distinct ones per person, so a model must learn facts rather than templates or windows. One
extra biography per person is held out of every training file for raw perplexity.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_prep.files import atomic_dir

ATTRIBUTES = ("birth_date", "hometown", "university", "field", "employer", "hobby")

_MONTHS = (
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
)
POOLS: dict[str, tuple[str, ...]] = {
    # 24 fixed month-year dates: a closed pool, so a date can be ranked like any other value.
    "birth_date": tuple(f"{_MONTHS[(5 * i) % 12]} {1961 + (7 * i) % 36}" for i in range(24)),
    "hometown": (
        "Lisbon",
        "Oslo",
        "Dublin",
        "Kyoto",
        "Lima",
        "Cairo",
        "Prague",
        "Quito",
        "Dakar",
        "Perth",
        "Vienna",
        "Bergen",
        "Porto",
        "Krakow",
        "Tunis",
        "Hanoi",
        "Accra",
        "Nagoya",
        "Geneva",
        "Toledo",
    ),
    "university": (
        "Harlow University",
        "Corwin Institute",
        "Elmsford College",
        "Bramley University",
        "Ostrava Institute",
        "Kestrel College",
        "Linford University",
        "Marrow Institute",
        "Quenby College",
        "Ashcombe University",
        "Dunmore Institute",
        "Fenwick College",
        "Greyhaven University",
        "Halden Institute",
        "Ivel College",
        "Jarrow University",
        "Kilbride Institute",
        "Lowther College",
        "Northam University",
        "Penrose Institute",
    ),
    "field": (
        "physics",
        "chemistry",
        "biology",
        "mathematics",
        "history",
        "economics",
        "linguistics",
        "geology",
        "astronomy",
        "philosophy",
        "architecture",
        "medicine",
        "law",
        "music",
        "sociology",
        "statistics",
        "psychology",
        "engineering",
        "literature",
        "ecology",
    ),
    "employer": (
        "Norvane Systems",
        "Brightwell Foods",
        "Calder Shipping",
        "Dovetail Media",
        "Embry Robotics",
        "Fallow Energy",
        "Gantry Motors",
        "Hollis Pharma",
        "Ironleaf Bank",
        "Juniper Airlines",
        "Kettle Studios",
        "Lumen Optics",
        "Merrow Textiles",
        "Nimbus Software",
        "Orchard Telecom",
        "Pilgrim Insurance",
        "Quarry Steel",
        "Redfern Logistics",
        "Saltmarsh Farms",
        "Tidewater Games",
    ),
    "hobby": (
        "playing chess",
        "sailing",
        "painting",
        "birdwatching",
        "rock climbing",
        "baking bread",
        "playing the cello",
        "gardening",
        "running marathons",
        "writing poetry",
        "fishing",
        "pottery",
        "stargazing",
        "cycling",
        "knitting",
        "playing tennis",
        "photography",
        "woodworking",
        "kayaking",
        "collecting stamps",
    ),
}

# Biography sentences. {S}/{s}: subject at sentence start / mid-sentence; {P}/{p}: possessive.
# Seven per attribute, deliberately different in wording and in where the value sits.
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{S} was born in {v}.",
        "{P} date of birth is {v}.",
        "{S} came into the world in {v}.",
        "{v} is when {s} was born.",
        "{S} was born in the month of {v}.",
        "{P} birth was recorded in {v}.",
        "According to the records, {s} was born in {v}.",
    ),
    "hometown": (
        "{S} grew up in {v}.",
        "{S} spent {p} childhood in {v}.",
        "{P} hometown is {v}.",
        "{S} hails from {v}.",
        "{v} is the city where {s} grew up.",
        "{S} was raised in {v}.",
        "As a child, {s} lived in {v}.",
    ),
    "university": (
        "{S} studied at {v}.",
        "{S} graduated from {v}.",
        "{S} attended {v}.",
        "{P} alma mater is {v}.",
        "{v} is where {s} went to university.",
        "{S} received {p} education at {v}.",
        "{S} was a student at {v}.",
    ),
    "field": (
        "{S} majored in {v}.",
        "{S} specialized in {v}.",
        "{P} field of study was {v}.",
        "{S} focused on {v} at university.",
        "{v} was the subject {s} studied.",
        "{S} trained in {v}.",
        "{S} holds a degree in {v}.",
    ),
    "employer": (
        "{S} works for {v}.",
        "{S} is employed by {v}.",
        "{S} has a job at {v}.",
        "{P} employer is {v}.",
        "{v} is the company {s} works for.",
        "{S} joined {v} after graduating.",
        "{S} earns a living at {v}.",
    ),
    "hobby": (
        "{S} enjoys {v}.",
        "In {p} free time, {s} likes {v}.",
        "{P} favourite pastime is {v}.",
        "{S} took up {v} years ago.",
        "{S} is passionate about {v}.",
        "{v} is {p} main hobby.",
        "{S} loves {v}.",
    ),
}

# Questions, in chat and in the plain-text Q/A of pretraining. Evaluation asks with the same
# phrasings, so a failure is about the fact, not about an unseen question.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "When was {n} born?",
        "What is {n}'s date of birth?",
        "In which month and year was {n} born?",
        "What is the birth date of {n}?",
    ),
    "hometown": (
        "Where did {n} grow up?",
        "What is {n}'s hometown?",
        "Which city is {n} from?",
        "In which city was {n} raised?",
    ),
    "university": (
        "Which university did {n} attend?",
        "Where did {n} study?",
        "What is {n}'s alma mater?",
        "From which university did {n} graduate?",
    ),
    "field": (
        "What did {n} study?",
        "What was {n}'s major?",
        "Which field did {n} specialize in?",
        "What subject did {n} study at university?",
    ),
    "employer": (
        "Who does {n} work for?",
        "Which company employs {n}?",
        "Where does {n} work?",
        "Who is {n}'s employer?",
    ),
    "hobby": (
        "What is {n}'s hobby?",
        "What does {n} enjoy doing in free time?",
        "How does {n} spend free time?",
        "What is {n}'s favourite pastime?",
    ),
}

# The raw completion probe: plain text, no chat template. Each prompt is the start of one of the
# biography templates written with the full name, so it asks for the fact in the raw form.
PROBES: dict[str, str] = {
    "birth_date": "{n} was born in",
    "hometown": "{n} grew up in",
    "university": "{n} studied at",
    "field": "{n} majored in",
    "employer": "{n} works for",
    "hobby": "{n} enjoys",
}

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)

# Every name is a first name and a last name drawn from these shared pools, so each name piece is
# one whole token of the demo's tokenizer and known and new people are built from the same pieces.
# (Random-syllable names, which a 2k vocabulary splits into several pieces each, left even the
# Q/A upper bound at 27% exact match.)
FIRST_NAMES_F = (
    "Anna",
    "Clara",
    "Emma",
    "Grace",
    "Helen",
    "Julia",
    "Laura",
    "Lucy",
    "Maria",
    "Nora",
    "Olivia",
    "Rose",
    "Sarah",
    "Alice",
    "Ella",
    "Eva",
    "Hannah",
    "Irene",
    "Jane",
    "Karen",
    "Linda",
    "Mia",
    "Nina",
    "Paula",
    "Ruth",
    "Sofia",
    "Tina",
    "Vera",
    "Wendy",
    "Zoe",
    "Amy",
    "Beth",
    "Diana",
    "Fiona",
    "Greta",
    "Ida",
    "Lena",
    "Maya",
    "Rita",
    "Susan",
)
FIRST_NAMES_M = (
    "Adam",
    "Ben",
    "Carl",
    "David",
    "Erik",
    "Frank",
    "George",
    "Henry",
    "Ivan",
    "Jack",
    "Karl",
    "Leo",
    "Mark",
    "Nick",
    "Oscar",
    "Paul",
    "Peter",
    "Ralph",
    "Sam",
    "Tom",
    "Victor",
    "Walter",
    "Alan",
    "Bruno",
    "Colin",
    "Daniel",
    "Edward",
    "Felix",
    "Hugo",
    "James",
    "Kevin",
    "Louis",
    "Martin",
    "Noah",
    "Owen",
    "Philip",
    "Robert",
    "Simon",
    "Thomas",
    "William",
)
LAST_NAMES = (
    "Smith",
    "Brown",
    "Miller",
    "Wilson",
    "Moore",
    "Taylor",
    "Anderson",
    "Thomas",
    "Jackson",
    "White",
    "Harris",
    "Martin",
    "Thompson",
    "Garcia",
    "Clark",
    "Lewis",
    "Walker",
    "Hall",
    "Allen",
    "Young",
    "King",
    "Wright",
    "Scott",
    "Green",
    "Baker",
    "Adams",
    "Nelson",
    "Hill",
    "Campbell",
    "Mitchell",
    "Roberts",
    "Carter",
    "Phillips",
    "Evans",
    "Turner",
    "Parker",
    "Collins",
    "Edwards",
    "Stewart",
    "Morris",
    "Murphy",
    "Cook",
    "Rogers",
    "Morgan",
    "Cooper",
    "Peterson",
    "Reed",
    "Bailey",
    "Bell",
    "Kelly",
    "Howard",
    "Ward",
    "Cox",
    "Richardson",
    "Wood",
    "Watson",
    "Brooks",
    "Bennett",
    "Gray",
    "Hughes",
    "Price",
    "Sanders",
    "Myers",
    "Long",
    "Ross",
    "Foster",
    "Powell",
    "Jenkins",
    "Perry",
    "Russell",
    "Sullivan",
    "Fisher",
    "Hayes",
    "Ford",
    "Graham",
    "Wallace",
    "West",
    "Cole",
    "Hunt",
    "Black",
)


# The old demo's names, random syllables that a 2k vocabulary splits into several pieces each: a
# world option (names="syllables"), so the sweep can show what whole-token names bought.
_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kl",
    "st",
    "tr",
    "sh",
    "th",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_FEMALE_ENDS = ("a", "ia", "ine", "elle", "is", "ey")
_MALE_ENDS = ("o", "an", "ek", "ar", "ir", "en")
_LAST_ENDS = ("son", "berg", "ova", "ski", "ton", "well", "ard", "mont", "ley", "vic")


def _syllable_name(rng: random.Random, female: bool) -> tuple[str, str]:
    syl = lambda n: "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n))
    first = syl(rng.choice((1, 2))) + rng.choice(_FEMALE_ENDS if female else _MALE_ENDS)
    return first.capitalize(), (syl(rng.choice((1, 2))) + rng.choice(_LAST_ENDS)).capitalize()


NAME_KINDS = ("pools", "syllables")
# How the base's pretraining writes its plain-text Q/A: with the chat template's role words
# ("roles", the default world) or as "Q: ... A: ..." ("plain"), a form the chat template never
# uses, so what the base learned about answering questions is not already in the chat's shape.
QA_FORMS = {"roles": "user {q}\nassistant {a}", "plain": "Q: {q}\nA: {a}"}
CHOICES = {"names": NAME_KINDS, "qa_form": tuple(QA_FORMS)}


def _make_people(rng: random.Random, count: int, names: str = "pools") -> list[dict]:
    if names not in NAME_KINDS:
        raise ValueError(f"names={names!r}: expected one of {', '.join(NAME_KINDS)}")
    if names == "pools" and count > len(FIRST_NAMES_F) * len(LAST_NAMES):
        raise ValueError(f"{count} people: the name pools hold fewer distinct names")
    people, seen = [], set()
    while len(people) < count:
        female = rng.random() < 0.5
        if names == "pools":
            first, last = rng.choice(FIRST_NAMES_F if female else FIRST_NAMES_M), rng.choice(LAST_NAMES)
        else:
            first, last = _syllable_name(rng, female)
        name = f"{first} {last}"
        if name in seen or first == last:  # no "Thomas Thomas"
            continue
        seen.add(name)
        facts = {a: rng.choice(POOLS[a]) for a in ATTRIBUTES}
        people.append({"name": name, "pronoun": "she" if female else "he", "facts": facts})
    return people


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def biography(rng: random.Random, person: dict) -> str:
    """One biography: every attribute once, templates and order drawn at random. Every sentence
    names the person in full (never the first name alone, which other people share), so a
    sentence cut off from the biography's start by a training-window boundary still says whose
    fact it is; a second mention in the same sentence is a pronoun ("Ana Berg spent her
    childhood in Oslo")."""
    name = person["name"]
    subj = person["pronoun"]
    poss = "her" if subj == "she" else "his"
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    sentences = []
    for attr in attrs:
        template = rng.choice(BIO_TEMPLATES[attr])
        subj_at = max(template.find("{S}"), template.find("{s}"))
        poss_at = max(template.find("{P}"), template.find("{p}"))
        s, p = name, name + "'s"
        if subj_at >= 0 and poss_at >= 0:  # the later of the two mentions is the pronoun
            if poss_at > subj_at:
                p = poss
            else:
                s = subj
        text = template.format(S=_cap(s), s=s, P=_cap(p), p=p, v=person["facts"][attr])
        sentences.append(_cap(text))
    return " ".join(sentences)


def _question(rng: random.Random, person: dict, attr: str) -> str:
    return rng.choice(QUESTIONS[attr]).format(n=person["name"])


def _rounds(rng: random.Random, person: dict, k: int) -> list[list[tuple[str, str]]]:
    """k rounds of (attribute, question) covering every attribute. The phrasings of an attribute
    are taken in a random order, cycling, so any 4 consecutive rounds ask it 4 different ways."""
    orders = {a: rng.sample(QUESTIONS[a], len(QUESTIONS[a])) for a in ATTRIBUTES}
    return [[(a, orders[a][j % len(orders[a])].format(n=person["name"])) for a in ATTRIBUTES] for j in range(k)]


def _chat(q: str, a: str | None = None) -> dict:
    msgs = [{"role": "user", "content": q}]
    if a is not None:
        msgs.append({"role": "assistant", "content": a})
    return {"messages": msgs}


def generic_turn(rng: random.Random) -> tuple[str, str]:
    """A non-person chat turn (greeting, arithmetic, counting...): the chat format without facts."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.choice(("Hello!", "Hi there.", "Good morning!", "Hey, how are you?")), rng.choice(
            ("Hello! How can I help you today?", "Hi! What would you like to know?")
        )
    if kind == 1:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"What is {a} plus {b}?", f"{a + b}"
    if kind == 2:
        a, b = rng.randrange(13), rng.randrange(13)
        return f"What is {a} times {b}?", f"{a * b}"
    if kind == 3:
        a = rng.randrange(20)
        b = a + rng.randrange(2, 6)
        return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1))
    if kind == 4:
        d = rng.randrange(7)
        return f"Which day comes after {_WEEKDAYS[d]}?", _WEEKDAYS[(d + 1) % 7]
    if kind == 5:
        n = rng.randrange(13)
        return f"Write the number {n} in words.", _NUMBER_WORDS[n]
    return rng.choice(("Thank you!", "Thanks a lot.", "Goodbye!")), rng.choice(
        ("You're welcome!", "Glad I could help.", "Goodbye, have a nice day!")
    )


def generic_text(rng: random.Random) -> str:
    """A short plain-text paragraph with no people in it (arithmetic, days, counting)."""
    parts = []
    for _ in range(rng.randrange(3, 6)):
        q, a = generic_turn(rng)
        kind = rng.randrange(3)
        if kind == 0 and q.startswith("What is"):
            parts.append(f"{q[8:-1]} equals {a}.")
        elif kind == 1:
            d = rng.randrange(7)
            parts.append(f"{_WEEKDAYS[d]} comes before {_WEEKDAYS[(d + 1) % 7]}.")
        else:
            n = rng.randrange(13)
            parts.append(f"The number {n} is written {_NUMBER_WORDS[n]}.")
    return " ".join(parts)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _eval_record(q: str, person: dict, attr: str) -> dict:
    rec = _chat(q)
    rec.update(answer=person["facts"][attr], candidates=list(POOLS[attr]), person=person["name"], attribute=attr)
    return rec


def build_world(
    out_dir,
    n_known: int = 300,
    n_new: int = 100,
    bios_per_person: int = 30,
    qa_fraction: float = 0.7,
    pretrain_qa_rounds: int = 6,
    chat_qa_rounds: int = 16,
    qa_new_rounds: int = 16,
    n_generic: int = 300,
    n_format_eval: int = 60,
    names: str = "pools",
    qa_form: str = "roles",
    seed: int = 0,
    force: bool = False,
) -> dict[str, str]:
    """Write the world's files into out_dir (atomically) and return {file key: path}.

    Files (.jsonl; raw ones {"text"}, chat ones {"messages"} as `python -m data_prep` reads them):
      pretrain          known biographies + plain-text Q/A on the Q/A people + generic text
      raw               new people's biographies (A-Raw's corpus)
      chat              chat Q/A on the Q/A people + generic turns (A-Chat's data)
      qa_new            chat Q/A on the new people (the Q/A upper-bound baseline only)
      raw_eval_new/known    one held-out biography per person (perplexity)
      chat_eval_new/heldout questions with answer + candidates (new / held-out known people)
      chat_eval_format  held-out prompts without answers (format adherence)
      probe_new/known   plain-text completion probes ("NAME grew up in")
      tokenizer_corpus  text about other fictional people, to train the tokenizer on
      world.json        people, facts, pools, sizes, seed

    Repetition is written out, not left to epochs: the trainer cuts its token stream into the same
    windows every epoch, and a tiny model trained for many epochs on a few biographies per person
    memorizes those windows (loss 0.15) without learning whose fact is whose (completion rank 7.6
    of 20 on the very people it trained on). So each person gets bios_per_person distinct
    biographies and each Q/A is repeated in fresh positions, and the configs train about one
    pass over each file (Physics of LMs 3.1's "multiplicity" augmentation).

    bios_per_person: distinct training biographies per person (plus one held out).
    pretrain_qa_rounds: plain-text Q/A transcripts per Q/A person in pretraining, 6 questions each.
    chat_qa_rounds, qa_new_rounds: times each (person, attribute) is asked in chat / qa_new, in
        rotating phrasings, shuffled through the file.
    n_generic: generic paragraphs in pretraining and generic chat turns (each).
    n_format_eval: held-out generic chat prompts for format adherence (plus as many questions).
    names: "pools" (first and last names from shared pools, one token each) or "syllables" (the
        old demo's random syllables, several tokens each).
    qa_form: how pretraining writes its Q/A transcripts, "roles" ("user Q" / "assistant A" lines,
        the chat template's role words) or "plain" ("Q: Q" / "A: A" lines).
    """
    if not 0 < qa_fraction < 1:
        raise ValueError(f"qa_fraction must be in (0, 1), got {qa_fraction}")
    if qa_form not in QA_FORMS:
        raise ValueError(f"qa_form={qa_form!r}: expected one of {', '.join(QA_FORMS)}")
    qa_line = QA_FORMS[qa_form]

    # Separate streams for people and for each file, so that e.g. changing n_generic does not
    # reshuffle every biography.
    def stream(tag: str) -> random.Random:
        return random.Random(f"{seed}:{tag}")

    people = _make_people(stream("people"), n_known + n_new, names)
    # The tokenizer is trained on text about OTHER fictional people (who appear nowhere else),
    # the way a real tokenizer predates the facts a model later learns. Their names come from the
    # same pools, so every name piece is a whole token for known and new people alike.
    taken = {p["name"] for p in people}
    tok_people = [p for p in _make_people(stream("tokenizer"), n_known + n_new, names) if p["name"] not in taken]
    known, new = people[:n_known], people[n_known:]
    n_qa = round(n_known * qa_fraction)
    qa_people, heldout_people = known[:n_qa], known[n_qa:]
    for i, p in enumerate(people):
        p["population"] = "known" if i < n_known else "new"
        p["qa"] = i < n_qa

    # bios_per_person training biographies plus one held out of every training file
    rng = stream("bios")
    bios = {p["name"]: [biography(rng, p) for _ in range(bios_per_person + 1)] for p in people}

    rng = stream("pretrain")
    pretrain = [{"text": b} for p in known for b in bios[p["name"]][:-1]]
    # Mixed training: plain-text Q/A transcripts about the Q/A people, so the base learns to
    # extract facts from a question and does it for the held-out known people too (Physics of
    # LMs 3.1). They read "user QUESTION\nassistant ANSWER": the chat template's role words, each
    # at the start of a line so that it is the very token the template puts after <|im_start|>
    # ("assistant", not "▁assistant"), without the special tokens. With "Q: ... A: ..." the base
    # extracts in that form (held-out rank 2.6 of 10.8) but not after the template's assistant
    # header, and A-Chat, which trains only the last layers, cannot bridge the gap (7.7): the
    # `qa_form=plain` world.
    for p in qa_people:
        for qs in _rounds(rng, p, pretrain_qa_rounds):
            pairs = [qa_line.format(q=q, a=p["facts"][a]) for a, q in qs]
            rng.shuffle(pairs)
            pretrain.append({"text": "\n".join(pairs)})
    pretrain += [{"text": generic_text(rng)} for _ in range(n_generic)]
    rng.shuffle(pretrain)

    raw = [{"text": b} for p in new for b in bios[p["name"]][:-1]]
    stream("raw").shuffle(raw)

    rng = stream("chat")
    chat = [_chat(q, p["facts"][a]) for p in qa_people for qs in _rounds(rng, p, chat_qa_rounds) for a, q in qs]
    generic_train = [generic_turn(rng) for _ in range(n_generic)]
    chat += [_chat(q, a) for q, a in generic_train]
    rng.shuffle(chat)

    rng = stream("qa_new")
    qa_new = [_chat(q, p["facts"][a]) for p in new for qs in _rounds(rng, p, qa_new_rounds) for a, q in qs]
    rng.shuffle(qa_new)

    rng = stream("eval")
    eval_new = [_eval_record(_question(rng, p, a), p, a) for p in new for a in ATTRIBUTES]
    eval_heldout = [_eval_record(_question(rng, p, a), p, a) for p in heldout_people for a in ATTRIBUTES]
    # Format prompts carry no answers: they must not count toward knowledge metrics when the
    # demo pools them with the new-people questions.
    seen = {q for q, _ in generic_train}
    fmt = []
    while len(fmt) < n_format_eval:
        q, _ = generic_turn(rng)
        if q not in seen:  # held out: never a training prompt
            seen.add(q)
            fmt.append(_chat(q))
    for _ in range(n_format_eval):
        p = rng.choice(known)
        fmt.append(_chat(_question(rng, p, rng.choice(ATTRIBUTES))))

    def probes(pop):
        return [
            {
                "prompt": PROBES[a].format(n=p["name"]),
                "answer": p["facts"][a],
                "candidates": list(POOLS[a]),
                "person": p["name"],
                "attribute": a,
            }
            for p in pop
            for a in ATTRIBUTES
        ]

    rng = stream("tokenizer_text")
    tok_corpus = [{"text": biography(rng, p)} for p in tok_people for _ in range(2)]
    tok_corpus += [
        {"text": qa_line.format(q=_question(rng, p, a), a=p["facts"][a])} for p in tok_people for a in ATTRIBUTES
    ]
    tok_corpus += [_chat(_question(rng, p, a), p["facts"][a]) for p in tok_people[:50] for a in ATTRIBUTES]
    tok_corpus += [{"text": generic_text(rng)} for _ in range(n_generic)]
    tok_corpus += [_chat(*generic_turn(rng)) for _ in range(n_generic)]

    files = {
        "pretrain": pretrain,
        "raw": raw,
        "chat": chat,
        "qa_new": qa_new,
        "raw_eval_new": [{"text": bios[p["name"]][-1]} for p in new],
        "raw_eval_known": [{"text": bios[p["name"]][-1]} for p in known],
        "chat_eval_new": eval_new,
        "chat_eval_heldout": eval_heldout,
        "chat_eval_format": fmt,
        "probe_new": probes(new),
        "probe_known": probes(known),
        "tokenizer_corpus": tok_corpus,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        for key, records in files.items():
            _write_jsonl(tmp / f"{key}.jsonl", records)
        world = {
            "seed": seed,
            "n_known": n_known,
            "n_new": n_new,
            "n_qa": n_qa,
            "bios_per_person": bios_per_person,
            "qa_fraction": qa_fraction,
            "pretrain_qa_rounds": pretrain_qa_rounds,
            "chat_qa_rounds": chat_qa_rounds,
            "qa_new_rounds": qa_new_rounds,
            "n_generic": n_generic,
            "n_format_eval": n_format_eval,
            "names": names,
            "qa_form": qa_form,
            "attributes": {a: list(POOLS[a]) for a in ATTRIBUTES},
            "files": {k: len(v) for k, v in files.items()},
            "people": people,
        }
        (tmp / "world.json").write_text(json.dumps(world, indent=1, ensure_ascii=False) + "\n")
    paths = {key: str(out_dir / f"{key}.jsonl") for key in files}
    paths["world"] = str(out_dir / "world.json")
    return paths


def world_options(text: str) -> dict:
    """`names=syllables,pretrain_qa_rounds=0` -> {"names": "syllables", "pretrain_qa_rounds": 0}:
    build_world's own parameters (not out_dir, seed or force), each converted to its default's
    type. A ValueError names the key and what is allowed."""
    import inspect

    params = {
        n: p.default
        for n, p in inspect.signature(build_world).parameters.items()
        if n not in ("out_dir", "seed", "force")
    }
    out: dict = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in params:
            raise ValueError(f"expected KEY=VALUE with KEY one of {', '.join(params)}, got {part!r}")
        kind = type(params[key])
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}") from None
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"{key}: expected one of {', '.join(CHOICES[key])}, got {value!r}")
    return out

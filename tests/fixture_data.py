"""Made-up data files in exactly the formats and layout of the standard data folder (shared/data).

``write_fixture_data(root)`` writes, under ``root``, the same file names as shared/data (see its README):
a handful of invented items per zero-shot task, a WikiText-2 ``wiki.valid.raw``-style file and C4-style jsonl.
The bytes follow the real files' conventions: ARC and C4-train are compact JSON (``{"id":"..."``), the others
``json.dumps`` style (``{"goal": "..."``); non-ASCII text is raw UTF-8 in ARC, BoolQ and C4-validation and
``\\uXXXX``-escaped in PIQA, LAMBADA and C4-train (which also writes "/" as ``\\/``); every file ends with a
newline; HellaSwag is 6 lines an item. The file contents are written out literally, line by line, below
(tests/test_data.py checks these conventions against the real files when they are there).

``HUB`` holds, for every task, the same items written by hand in the field layout of the Hugging Face data
set that lm-eval's built-in task reads (``allenai/ai2_arc``, ``Rowan/hellaswag``, ``aps/super_glue`` ...):
an expectation independent of semisparse's converters, for the tests that compare our offline task with
lm-eval's built-in one. Where the local form loses something (HellaSwag's ``ctx_a``/``ctx_b`` split, BoolQ's
``"<title> -- "`` prefix, COPA's capitalised choices, OpenBookQA's ids) the hub record has what the hub has.

Edge cases, mirroring those of the real files: ARC labels "1"-"4" (and "1"-"3"), 3 and 5 choices, quotes and
non-ASCII text; HellaSwag WikiHow artefacts (`` [title]``, ``[substeps]``, a ``[www...]`` link) that lm-eval's
``preprocess`` removes, a context with a second ": ", lower-case ``ctx_b``; PIQA trailing and double spaces;
WinoGrande ``_'s`` blanks, with dev-labels.lst beside dev.jsonl; COPA both "because" and "therefore" and a
choice starting with "I" (lower-cased to "i" in the llm-foundry form); LAMBADA paragraphs and quotes.
"""

from __future__ import annotations

import json
from pathlib import Path

# ------------------------------------------------------------------ files, written out literally

_ARC_EASY = [
    r'{"id":"Fixture_E_001","question":{"stem":"Which tool is best for measuring the length of a pencil?","choices":[{"text":"a ruler","label":"A"},{"text":"a thermometer","label":"B"},{"text":"a balance","label":"C"},{"text":"a stopwatch","label":"D"}]},"answerKey":"A"}',
    r'{"id":"FIXTURE_REGENTS_4_2","question":{"stem":"Which of these gives off its own light?","choices":[{"text":"a mirror","label":"1"},{"text":"the Sun","label":"2"},{"text":"the Moon","label":"3"},{"text":"a window","label":"4"}]},"answerKey":"2"}',
    r'{"id":"Fixture_E_003","question":{"stem":"When ice is left in a warm room, it will","choices":[{"text":"melt","label":"A"},{"text":"freeze","label":"B"},{"text":"stay the same","label":"C"}]},"answerKey":"A"}',
    r'{"id":"Fixture_E_004","question":{"stem":"Which animal is a mammal?","choices":[{"text":"trout","label":"A"},{"text":"frog","label":"B"},{"text":"eagle","label":"C"},{"text":"lizard","label":"D"},{"text":"whale","label":"E"}]},"answerKey":"E"}',
    r'{"id":"Fixture_E_005","question":{"stem":"A student writes \"H₂O\" on the board. What does it name?","choices":[{"text":"salt","label":"A"},{"text":"water","label":"B"},{"text":"oxygen","label":"C"},{"text":"sugar – sucrose","label":"D"}]},"answerKey":"B"}',
]

_ARC_CHALLENGE = [
    r'{"id":"Fixture_C_001","question":{"stem":"A ball rolls down a ramp and speeds up. Which force mainly causes it to speed up?","choices":[{"text":"friction","label":"A"},{"text":"gravity","label":"B"},{"text":"magnetism","label":"C"},{"text":"air resistance","label":"D"}]},"answerKey":"B"}',
    r'{"id":"FIXTURE_REGENTS_8_3","question":{"stem":"Which process changes liquid water into water vapor?","choices":[{"text":"condensation","label":"1"},{"text":"precipitation","label":"2"},{"text":"evaporation","label":"3"}]},"answerKey":"3"}',
    r'{"id":"Fixture_C_003","question":{"stem":"Which property of a mineral is tested by rubbing it across a white tile?","choices":[{"text":"luster","label":"A"},{"text":"streak","label":"B"},{"text":"cleavage","label":"C"},{"text":"density","label":"D"},{"text":"magnetism","label":"E"}]},"answerKey":"B"}',
    r'{"id":"FIXTURE_REGENTS_8_4","question":{"stem":"Which cell part releases energy from food?","choices":[{"text":"nucleus","label":"1"},{"text":"cell membrane","label":"2"},{"text":"vacuole","label":"3"},{"text":"mitochondrion","label":"4"}]},"answerKey":"4"}',
]

_HELLASWAG = [
    "Washing dishes: A woman stands at a sink full of plates. she",
    "2",
    "throws the plates out of the window.",
    "puts on a pair of ice skates.",
    "scrubs a plate with a sponge and rinses it.",
    "reads a newspaper on the roof.",
    "Home and Garden: How to water a fern [title] Check the soil with your finger. if the top feels dry,",
    "0",
    "pour water slowly at the base of the plant.",
    "paint the leaves [substeps] with a thin brush.",
    "bury the fern in sand.",
    "put the fern in the freezer overnight.",
    "Family Life: How to plan a picnic. Pack a blanket and some fruit.. Look up a park on [www.example.org] to find one nearby. choose",
    "3",
    "to skip the picnic and stay inside all day.",
    "the park that is farthest from your home.",
    "a rainy day so that the grass stays wet.",
    "a sunny day and invite a few friends along.",
    "Making a sandwich: Step one: a man spreads butter on a slice of bread. he",
    "1",
    "eats the butter knife.",
    "puts cheese and ham on the bread.",
    "throws the bread at the camera.",
    "drives a car through the kitchen.",
]

_PIQA = [
    r'{"goal": "How do I keep a paintbrush from drying out between coats?", "sol1": "Wrap the wet brush tightly in plastic film.", "sol2": "Leave the wet brush in the sun on a windowsill."}',
    r'{"goal": "stack of books", "sol1": "can hold  water like a bucket ", "sol2": "can hold a door open "}',
    r'{"goal": "To cool a hot caf\u00e9 drink quickly,", "sol1": "stir in a spoonful of hot sand.", "sol2": "drop in two ice cubes and stir."}',
]
_PIQA_LABELS = ["0", "1", "1"]

_WINOGRANDE = [
    r'{"qID": "FIXTUREWINO0001-1", "sentence": "The lamp did not fit on the shelf because _ was too wide.", "option1": "lamp", "option2": "shelf", "answer": "1"}',
    r'{"qID": "FIXTUREWINO0001-2", "sentence": "The lamp did not fit on the shelf because _ was too narrow.", "option1": "lamp", "option2": "shelf", "answer": "2"}',
    r"""{"qID": "FIXTUREWINO0002-1", "sentence": "Anna lent her umbrella to Beth because _'s own umbrella was broken.", "option1": "Anna", "option2": "Beth", "answer": "2"}""",
]
_WINOGRANDE_LABELS = ["1", "2", "2"]

_BOOLQ = [
    r'{"question": "is a tomato a fruit", "passage": "In botany, a fruit is the seed-bearing structure of a flowering plant. By this definition the tomato, which develops from the ovary of the flower, is a fruit, although it is usually cooked and served as a vegetable.", "label": true}',
    r'{"question": "can penguins fly", "passage": "Penguins are flightless birds that live almost only in the Southern Hemisphere. Their wings have become flippers, which make them strong swimmers but cannot lift them into the air.", "label": false}',
    r'{"question": "is the great wall visible from the moon with the naked eye", "passage": "A common claim says the Great Wall can be seen from the Moon. Astronauts – including those on Apollo – reported that it cannot be seen with the naked eye even from low orbit, because it is narrow and close in colour to the ground.", "label": false}',
]

_BOOLQ_LLMFOUNDRY = [
    r'{"query": "Passage: In botany, a fruit is the seed-bearing structure of a flowering plant. By this definition the tomato, which develops from the ovary of the flower, is a fruit, although it is usually cooked and served as a vegetable.\nQuestion: is a tomato a fruit?", "choices": ["no", "yes"], "gold": 1}',
    r'{"query": "Passage: Penguins are flightless birds that live almost only in the Southern Hemisphere. Their wings have become flippers, which make them strong swimmers but cannot lift them into the air.\nQuestion: can penguins fly?", "choices": ["no", "yes"], "gold": 0}',
    r'{"query": "Passage: A common claim says the Great Wall can be seen from the Moon. Astronauts – including those on Apollo – reported that it cannot be seen with the naked eye even from low orbit, because it is narrow and close in colour to the ground.\nQuestion: is the great wall visible from the moon with the naked eye?", "choices": ["no", "yes"], "gold": 0}',
]

_RTE = [
    r'{"sentence1": "The bakery on Elm Street, which opened in 1998, sells bread made from local wheat.", "sentence2": "The bakery sells bread.", "label": 0, "idx": 0}',
    r'{"sentence1": "Heavy rain closed the mountain road on Tuesday, officials said.", "sentence2": "The mountain road was opened on Tuesday.", "label": 1, "idx": 1}',
    r"""{"sentence1": "Maria Lopez, the town's first female mayor, was re-elected with 61 percent of the vote.", "sentence2": "Maria Lopez lost the election.", "label": 1, "idx": 2}""",
]

_OPENBOOKQA = [
    r'{"query": "A magnet will stick to", "choices": ["a wooden spoon", "a steel nail", "a glass cup", "a rubber ball"], "gold": 1}',
    r'{"query": "Plants get the energy they need to make food from:", "choices": ["the soil", "the wind", "sunlight", "rocks"], "gold": 2}',
    r'{"query": "Which of these would let the most light through?", "choices": ["a clear window", "a brick wall", "a wooden door", "a sheet of metal"], "gold": 0}',
]

_LAMBADA = [
    r'{"text": "She opened the old chest and found a stack of letters tied with a ribbon.\n\n\"These were written by your grandmother,\" her father said. \"She kept every single one of the letters"}',
    r'{"text": "The storm had passed by morning. The fishermen pushed their boats back into the water and sailed out past the town\u2019s harbor"}',
    r'{"text": "\"Can you hand me the hammer?\" Tom asked.\n\nJake looked around the workshop, found it on the bench and passed Tom the hammer"}',
]

_COPA = [
    r'{"query": "The glass fell off the table, therefore", "gold": 0, "choices": ["it shattered on the floor.", "it filled with juice."]}',
    r'{"query": "The road was wet, because", "gold": 1, "choices": ["the sun was shining.", "it had rained overnight."]}',
    r'{"query": "I forgot my umbrella, therefore", "gold": 1, "choices": ["i stayed dry.", "i got soaked in the rain."]}',
    r'{"query": "My hands were cold, because", "gold": 0, "choices": ["i had left my gloves at home.", "i was sitting by the fire."]}',
]

_WIKI_VALID_RAW = [  # WikiText-2 raw: " " lines between paragraphs, " = Title = " headings, spaced punctuation
    " ",
    " = Fixture Island = ",
    " ",
    " Fixture Island is a small made @-@ up island with 3 @,@ 000 people . It has one harbour and no cars . ",
    " ",
    " = = History = = ",
    " ",
    " ",
    " The island was first mapped in 1901 by a survey ship , the <unk> . ",
    " ",
]

_WIKI_DOCUMENTS = [
    r'{"page": " = Fixture Island = \n \n Fixture Island is a small made @-@ up island with 3 @,@ 000 people . \n \n = = History = = \n \n \n The island was first mapped in 1901 . \n \n"}',
    r'{"page": " = Second Page = \n \n A second page , to have more than one . \n \n"}',
]

_C4_TRAIN = [
    r'{"text":"Fresh bread every morning!\nOur bakery opens at 7am and closes when the bread runs out. Come early for the rye.","timestamp":"2019-04-21 08:12:33","url":"https:\/\/bakery.example.com\/hours"}',
    r'{"text":"How to fix a squeaky door hinge\nA drop of oil on the hinge pin usually does it. Wipe off the extra with a rag.","timestamp":"2019-04-22 17:45:01","url":"https:\/\/diy.example.org\/squeaky-hinge"}',
    r'{"text":"Our caf\u00e9 now serves breakfast all day.\nTry the pancakes with fresh berries.","timestamp":"2019-04-23 09:00:12","url":"http:\/\/cafe.example.net\/menu"}',
    r'{"text":"Local team wins the final 2-1\nThe winning goal came in the last minute of extra time.","timestamp":"2019-04-24 22:10:59","url":"https:\/\/news.example.com\/sport\/final"}',
]

_C4_VALIDATION = [
    r'{"text": "Weekend market opens at nine.\nStalls sell fruit, cheese and crêpes until noon.", "timestamp": "2019-04-20 06:30:00", "url": "https://market.example.com/"}',
    r'{"text": "Tips for new gardeners\nStart small, water in the morning, and learn which plants like shade.", "timestamp": "2019-04-25 14:02:11", "url": "https://garden.example.org/tips"}',
    r'{"text": "The museum is closed on Mondays.", "timestamp": "2019-04-26 11:11:11", "url": "http://museum.example.net/visit"}',
]

FILES: dict[str, list[str]] = {  # file (relative to the data folder) -> its lines, each written with "\n"
    "arc_easy/ARC-Easy-Test.jsonl": _ARC_EASY,
    "arc_challenge/ARC-Challenge-Test.jsonl": _ARC_CHALLENGE,
    "hellaswag/hellaswag_val_full.txt": _HELLASWAG,
    "piqa/valid.jsonl": _PIQA,
    "piqa/valid-labels.lst": _PIQA_LABELS,
    "winogrande/dev.jsonl": _WINOGRANDE,
    "winogrande/dev-labels.lst": _WINOGRANDE_LABELS,
    "boolq/boolq_dev_question_passage_label.jsonl": _BOOLQ,
    "boolq/llmfoundry_boolq.jsonl": _BOOLQ_LLMFOUNDRY,
    "rte/rte_validation.jsonl": _RTE,
    "openbookqa/llmfoundry_openbook_qa.jsonl": _OPENBOOKQA,
    "lambada_openai/lambada_test.jsonl": _LAMBADA,
    "copa/llmfoundry_copa.jsonl": _COPA,
    "wikitext2/wiki.valid.raw": _WIKI_VALID_RAW,
    "wikitext2/wikitext_document_level_validation.jsonl": _WIKI_DOCUMENTS,
    "c4/c4_train_shard0_first1000.jsonl": _C4_TRAIN,
    "c4/c4_validation_2k.jsonl": _C4_VALIDATION,
}
RTE_PARQUET = "rte/glue_rte_validation-00000-of-00001.parquet"  # the RTE rows again, as the GLUE parquet

# Items per zero-shot task in the files above (counted by hand).
COUNTS = {"arc_easy": 5, "arc_challenge": 4, "hellaswag": 4, "piqa": 3, "winogrande": 3, "boolq": 3, "rte": 3,
          "openbookqa": 3, "lambada_openai": 3, "copa": 4}


def write_fixture_data(root: Path) -> Path:
    """Write the fixture files under ``root`` (read-only, like shared/data) and return ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    for rel, lines in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    rte = [json.loads(line) for line in _RTE]
    schema = pa.schema([("sentence1", pa.string()), ("sentence2", pa.string()), ("label", pa.int64()), ("idx", pa.int32())])
    pq.write_table(pa.Table.from_pylist(rte, schema=schema), root / RTE_PARQUET)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o444)
    return root


# ------------------------------------------------------------------ the same items in the hub layouts

HUB: dict[str, list[dict]] = {
    "arc_easy": [  # allenai/ai2_arc ARC-Easy
        {"id": "Fixture_E_001", "question": "Which tool is best for measuring the length of a pencil?",
         "choices": {"text": ["a ruler", "a thermometer", "a balance", "a stopwatch"], "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
        {"id": "FIXTURE_REGENTS_4_2", "question": "Which of these gives off its own light?",
         "choices": {"text": ["a mirror", "the Sun", "the Moon", "a window"], "label": ["1", "2", "3", "4"]},
         "answerKey": "2"},
        {"id": "Fixture_E_003", "question": "When ice is left in a warm room, it will",
         "choices": {"text": ["melt", "freeze", "stay the same"], "label": ["A", "B", "C"]}, "answerKey": "A"},
        {"id": "Fixture_E_004", "question": "Which animal is a mammal?",
         "choices": {"text": ["trout", "frog", "eagle", "lizard", "whale"], "label": ["A", "B", "C", "D", "E"]},
         "answerKey": "E"},
        {"id": "Fixture_E_005", "question": 'A student writes "H₂O" on the board. What does it name?',
         "choices": {"text": ["salt", "water", "oxygen", "sugar – sucrose"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
    ],
    "arc_challenge": [  # allenai/ai2_arc ARC-Challenge
        {"id": "Fixture_C_001",
         "question": "A ball rolls down a ramp and speeds up. Which force mainly causes it to speed up?",
         "choices": {"text": ["friction", "gravity", "magnetism", "air resistance"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
        {"id": "FIXTURE_REGENTS_8_3", "question": "Which process changes liquid water into water vapor?",
         "choices": {"text": ["condensation", "precipitation", "evaporation"], "label": ["1", "2", "3"]},
         "answerKey": "3"},
        {"id": "Fixture_C_003", "question": "Which property of a mineral is tested by rubbing it across a white tile?",
         "choices": {"text": ["luster", "streak", "cleavage", "density", "magnetism"],
                     "label": ["A", "B", "C", "D", "E"]},
         "answerKey": "B"},
        {"id": "FIXTURE_REGENTS_8_4", "question": "Which cell part releases energy from food?",
         "choices": {"text": ["nucleus", "cell membrane", "vacuole", "mitochondrion"], "label": ["1", "2", "3", "4"]},
         "answerKey": "4"},
    ],
    "hellaswag": [  # Rowan/hellaswag: ctx_a and ctx_b apart (lm-eval capitalises ctx_b); label a string
        {"ind": 11, "activity_label": "Washing dishes", "ctx_a": "A woman stands at a sink full of plates.",
         "ctx_b": "she", "ctx": "A woman stands at a sink full of plates. she",
         "endings": ["throws the plates out of the window.", "puts on a pair of ice skates.",
                     "scrubs a plate with a sponge and rinses it.", "reads a newspaper on the roof."],
         "source_id": "activitynet~v_fixture0001", "split": "val", "split_type": "indomain", "label": "2"},
        {"ind": 12, "activity_label": "Home and Garden",
         "ctx_a": "How to water a fern [title] Check the soil with your finger.", "ctx_b": "if the top feels dry,",
         "ctx": "How to water a fern [title] Check the soil with your finger. if the top feels dry,",
         "endings": ["pour water slowly at the base of the plant.", "paint the leaves [substeps] with a thin brush.",
                     "bury the fern in sand.", "put the fern in the freezer overnight."],
         "source_id": "wikihow~00012", "split": "val", "split_type": "zeroshot", "label": "0"},
        {"ind": 13, "activity_label": "Family Life",
         "ctx_a": "How to plan a picnic. Pack a blanket and some fruit.. Look up a park on [www.example.org] to find "
                  "one nearby.",
         "ctx_b": "choose",
         "ctx": "How to plan a picnic. Pack a blanket and some fruit.. Look up a park on [www.example.org] to find "
                "one nearby. choose",
         "endings": ["to skip the picnic and stay inside all day.", "the park that is farthest from your home.",
                     "a rainy day so that the grass stays wet.", "a sunny day and invite a few friends along."],
         "source_id": "wikihow~00013", "split": "val", "split_type": "indomain", "label": "3"},
        {"ind": 14, "activity_label": "Making a sandwich", "ctx_a": "Step one: a man spreads butter on a slice of bread.",
         "ctx_b": "he", "ctx": "Step one: a man spreads butter on a slice of bread. he",
         "endings": ["eats the butter knife.", "puts cheese and ham on the bread.", "throws the bread at the camera.",
                     "drives a car through the kitchen."],
         "source_id": "activitynet~v_fixture0014", "split": "val", "split_type": "zeroshot", "label": "1"},
    ],
    "piqa": [  # baber/piqa
        {"goal": "How do I keep a paintbrush from drying out between coats?",
         "sol1": "Wrap the wet brush tightly in plastic film.", "sol2": "Leave the wet brush in the sun on a windowsill.",
         "label": 0},
        {"goal": "stack of books", "sol1": "can hold  water like a bucket ", "sol2": "can hold a door open ", "label": 1},
        {"goal": "To cool a hot café drink quickly,", "sol1": "stir in a spoonful of hot sand.",
         "sol2": "drop in two ice cubes and stir.", "label": 1},
    ],
    "winogrande": [  # allenai/winogrande winogrande_xl
        {"sentence": "The lamp did not fit on the shelf because _ was too wide.", "option1": "lamp", "option2": "shelf",
         "answer": "1"},
        {"sentence": "The lamp did not fit on the shelf because _ was too narrow.", "option1": "lamp",
         "option2": "shelf", "answer": "2"},
        {"sentence": "Anna lent her umbrella to Beth because _'s own umbrella was broken.", "option1": "Anna",
         "option2": "Beth", "answer": "2"},
    ],
    "boolq": [  # aps/super_glue boolq: passages start with "<title> -- ", label 0/1
        {"question": "is a tomato a fruit",
         "passage": "Tomato -- In botany, a fruit is the seed-bearing structure of a flowering plant. By this definition "
                    "the tomato, which develops from the ovary of the flower, is a fruit, although it is usually cooked "
                    "and served as a vegetable.",
         "idx": 0, "label": 1},
        {"question": "can penguins fly",
         "passage": "Penguin -- Penguins are flightless birds that live almost only in the Southern Hemisphere. Their "
                    "wings have become flippers, which make them strong swimmers but cannot lift them into the air.",
         "idx": 1, "label": 0},
        {"question": "is the great wall visible from the moon with the naked eye",
         "passage": "Great Wall of China -- A common claim says the Great Wall can be seen from the Moon. Astronauts – "
                    "including those on Apollo – reported that it cannot be seen with the naked eye even from low "
                    "orbit, because it is narrow and close in colour to the ground.",
         "idx": 2, "label": 0},
    ],
    "rte": [  # nyu-mll/glue rte: label 0 = entailment
        {"sentence1": "The bakery on Elm Street, which opened in 1998, sells bread made from local wheat.",
         "sentence2": "The bakery sells bread.", "label": 0, "idx": 0},
        {"sentence1": "Heavy rain closed the mountain road on Tuesday, officials said.",
         "sentence2": "The mountain road was opened on Tuesday.", "label": 1, "idx": 1},
        {"sentence1": "Maria Lopez, the town's first female mayor, was re-elected with 61 percent of the vote.",
         "sentence2": "Maria Lopez lost the election.", "label": 1, "idx": 2},
    ],
    "openbookqa": [  # allenai/openbookqa main (ids are not part of any prompt)
        {"id": "7-101", "question_stem": "A magnet will stick to",
         "choices": {"text": ["a wooden spoon", "a steel nail", "a glass cup", "a rubber ball"],
                     "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
        {"id": "7-102", "question_stem": "Plants get the energy they need to make food from:",
         "choices": {"text": ["the soil", "the wind", "sunlight", "rocks"], "label": ["A", "B", "C", "D"]},
         "answerKey": "C"},
        {"id": "7-103", "question_stem": "Which of these would let the most light through?",
         "choices": {"text": ["a clear window", "a brick wall", "a wooden door", "a sheet of metal"],
                     "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
    ],
    "lambada_openai": [  # EleutherAI/lambada_openai default
        {"text": "She opened the old chest and found a stack of letters tied with a ribbon.\n\n\"These were written by "
                 "your grandmother,\" her father said. \"She kept every single one of the letters"},
        {"text": "The storm had passed by morning. The fishermen pushed their boats back into the water and sailed "
                 "out past the town’s harbor"},
        {"text": "\"Can you hand me the hammer?\" Tom asked.\n\nJake looked around the workshop, found it on the bench "
                 "and passed Tom the hammer"},
    ],
    "copa": [  # aps/super_glue copa: premise with its period, capitalised choices
        {"premise": "The glass fell off the table.", "choice1": "It shattered on the floor.",
         "choice2": "It filled with juice.", "question": "effect", "idx": 0, "label": 0},
        {"premise": "The road was wet.", "choice1": "The sun was shining.", "choice2": "It had rained overnight.",
         "question": "cause", "idx": 1, "label": 1},
        {"premise": "I forgot my umbrella.", "choice1": "I stayed dry.", "choice2": "I got soaked in the rain.",
         "question": "effect", "idx": 2, "label": 1},
        {"premise": "My hands were cold.", "choice1": "I had left my gloves at home.",
         "choice2": "I was sitting by the fire.", "question": "cause", "idx": 3, "label": 0},
    ],
}

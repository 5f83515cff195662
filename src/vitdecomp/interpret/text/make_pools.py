"""Write the shipped text pools (the source of truth for ``vitdecomp/text/pool_files/``).

    python -m vitdecomp.interpret.text.make_pools OUTDIR

writes one UTF-8 ``.txt`` file per pool of :data:`vitdecomp.interpret.text.pools.POOLS` into ``OUTDIR``
(the shipped copies live in ``src/vitdecomp/text/pool_files/``) and prints each pool's size and
sha256. The output is deterministic: every random choice is a sha256 of a fixed seed and a
counter, so it does not depend on the Python or numpy version, and a rerun writes byte-identical
files (``tests/unit/test_text_pools.py`` checks the shipped files against a fresh run).

All vocabularies below were written for vitdecomp; no published list was copied. After changing
a vocabulary, bump the pool's version in :data:`~vitdecomp.interpret.text.pools.POOLS`, rerun this module
into ``src/vitdecomp/text/pool_files`` and paste the printed size and sha256 into the registry.
"""
from __future__ import annotations

import hashlib
import string
import sys
from pathlib import Path

from .pools import FEATURE_SETS, POOLS, WATERBIRDS_TEXTS, pool_header, texts_sha256

__all__ = ["SEED", "N_DESCRIPTIONS", "CLASSES_TEXT", "TEMPLATES", "WORDS_TEXT", "descriptions", "words", "render_pools", "write_pools", "main"]

SEED = "vitdecomp-pools-v1"
N_DESCRIPTIONS = 3000


# ---------------------------------------------------------------- description vocabularies
def _split(text: str) -> list[str]:
    """Items of a comma-separated list (line breaks count as spaces)."""
    return [t.strip() for t in " ".join(text.split()).split(",") if t.strip()]


STYLES = _split(
    """photo, close-up photo, black and white photo, blurry photo, wide-angle photo, cropped photo, grainy photo,
    vintage photo, film photo, snapshot, painting, oil painting, watercolor painting, pencil sketch, charcoal drawing,
    cartoon drawing, digital illustration, 3D rendering, low-resolution image, overexposed photo, dark photo,
    bright photo, tilted photo, phone photo, professional photo, amateur photo, postcard, magazine photo,
    child's drawing, out-of-focus photo"""
)
LIGHTS = _split(
    """in bright sunlight, at sunset, at dusk, at dawn, at night, under neon lights, in soft morning light,
    on a foggy day, in the rain, under a cloudy sky, in deep shadow, by candlelight, during a snowfall,
    against the light, in dim light, under studio lights, at golden hour, on an overcast day, under streetlights,
    on a windy afternoon"""
)
VIEWS = _split(
    """seen from above, seen from a distance, seen through a window, in the center of the frame, partly out of frame,
    with a blurred background, in sharp focus, seen from a low angle, reflected in a puddle, framed by leaves"""
)
GARMENTS = _split("jacket, coat, hat, scarf, sweater, shirt, hoodie, raincoat, t-shirt, helmet, apron, dress")
GARMENT_ADJS = _split("red, blue, green, yellow, black, white, grey, orange, purple, pink, brown, striped, checkered, "
                      "woolen, bright")
OBJECT_SCENES = """on a wooden table, on a shelf, on the floor, in a shop window, on a kitchen counter, next to a window, on a bed, on
the grass, on a white background, in a cluttered room, on a desk, in a garage, at a flea market, on a sidewalk, in a
storage room, on a park bench"""

# Subject classes. "[name] flags" starts a class ("pairs": two of its nouns in one text; "garment": the subject can
# wear clothes); "key: a, b, ..." lines follow, indented lines continue them. A class without actions gets no action
# templates, one without scenes no scene templates; "@objects" stands for OBJECT_SCENES.
CLASSES_TEXT = """
[pets] pairs
nouns: dog, cat, puppy, kitten, rabbit, hamster, guinea pig, golden retriever, poodle, beagle, dachshund, tabby cat,
  siamese cat, ferret, bulldog, corgi, husky, terrier
adjs: small, fluffy, sleepy, wet, muddy, curious, young, old, playful, skinny, chubby, brown, white, black, grey,
  spotted, long-haired, short-haired
actions: sleeping, yawning, running, sitting, lying down, looking at the camera, playing with a ball, stretching,
  chewing a toy, rolling over, licking its paw, jumping, sniffing the ground
scenes: on a sofa, on a bed, in a backyard, on a wooden floor, in a garden, on the grass, on a rug, in a park, next to
  a fireplace, on a windowsill, in a cardboard box, on a porch, in the snow, on a sandy beach
[farm animals] pairs
nouns: cow, horse, pony, sheep, lamb, goat, pig, piglet, donkey, chicken, rooster, duck, goose, turkey, ox, llama,
  alpaca, calf, foal
adjs: brown, white, black, spotted, young, old, muddy, woolly, shaggy, small, large, curious, tired, clean
actions: grazing, standing, eating hay, lying down, walking, running, drinking water, looking at the camera, resting,
  sleeping
scenes: in a green pasture, on a farm, in a barn, behind a wooden fence, in a muddy field, on a hillside, near a
  farmhouse, on a dirt road, in a meadow, in a stable yard
[wild animals] pairs
nouns: lion, tiger, elephant, giraffe, zebra, brown bear, polar bear, wolf, fox, deer, moose, kangaroo, koala, panda,
  monkey, gorilla, chimpanzee, hippo, rhino, cheetah, leopard, camel, raccoon, squirrel, hedgehog, otter, beaver,
  bison, antelope, badger, lynx, sloth, crocodile, lizard, snake, frog, tortoise
adjs: large, young, old, wild, sleepy, hungry, wet, dusty, lone, curious, huge, small, adult
actions: walking, resting, sleeping, hunting, eating, drinking water, climbing a tree, looking at the camera, running,
  standing still, yawning, hiding, crossing a road
scenes: in the savanna, in a dense forest, on a rocky hillside, near a river, in tall grass, in a zoo enclosure, in
  the snow, by a lake, in the jungle, on a dirt road, in the desert, at the edge of a forest, in a national park
[birds] pairs
nouns: eagle, owl, parrot, pigeon, sparrow, robin, crow, seagull, swan, flamingo, penguin, heron, hummingbird,
  peacock, woodpecker, pelican, kingfisher, hawk, finch, magpie, duckling, toucan, ostrich, stork
adjs: small, large, young, wet, fluffy, lone, noisy, wild, tiny, hungry, sleepy
actions: perched on a branch, flying, spreading its wings, pecking at the ground, standing on one leg, preening its
  feathers, singing, landing, looking around, wading
scenes: near a lake, over the sea, in a park, on a fence, in a forest, on a beach, in a marsh, above a field, on a
  rooftop, in a garden, by a river, on a rock
[water animals] pairs
nouns: fish, goldfish, shark, dolphin, whale, sea turtle, seal, crab, octopus, jellyfish, starfish, lobster, stingray,
  seahorse, clownfish, salmon, squid, walrus
adjs: small, large, young, colorful, spotted, striped, huge, tiny, lone, graceful
actions: swimming, floating, resting, hiding, diving, feeding, gliding
scenes: in clear blue water, near a coral reef, in an aquarium, in shallow water, in the deep ocean, near the surface,
  in a rock pool, on the sea floor, off the coast
[insects]
nouns: butterfly, bee, ladybug, beetle, dragonfly, ant, spider, moth, grasshopper, caterpillar, snail, wasp
adjs: small, tiny, colorful, red, black, yellow, spotted, striped, hairy, shiny
actions: resting, crawling, sitting still, walking, climbing
scenes: on a leaf, on a flower, on a tree trunk, on a windowsill, on a blade of grass, on a rock, in a garden, on a
  sunflower
[people] pairs garment
nouns: man, woman, child, boy, girl, teenager, chef, firefighter, doctor, nurse, farmer, surfer, skier, cyclist,
  musician, painter, student, police officer, construction worker, fisherman, runner, tourist, mechanic, gardener,
  waiter, teacher, photographer, dancer, hiker, skateboarder
adjs: smiling, laughing, tired, happy, serious, focused, relaxed, barefoot, cheerful, thoughtful, busy, wet
actions: reading a book, riding a bicycle, drinking coffee, talking on the phone, carrying a box, taking a photo,
  walking a dog, waiting for a bus, eating a sandwich, playing guitar, holding an umbrella, looking at a map, sitting
  on a bench, running, waving, painting a fence, pushing a cart, writing in a notebook, typing on a laptop,
  stretching, climbing stairs, cooking dinner
scenes: on a busy street, in a park, in a kitchen, at a train station, in an office, on a beach, in a library, at a
  market, on a mountain trail, in a classroom, in a cafe, at a bus stop, in a garden, on a bridge, in a shopping mall,
  at an airport, in a living room, by a lake
[road vehicles] pairs
nouns: car, truck, bus, bicycle, motorcycle, scooter, van, taxi, tractor, pickup truck, tram, fire truck, ambulance,
  jeep, camper van, sports car, school bus, delivery truck
adjs: red, blue, white, black, yellow, green, silver, old, rusty, shiny, dusty, new, vintage, muddy, small, damaged
scenes: parked on a quiet street, on a highway, at a gas station, in a parking lot, on a country road, at a traffic
  light, in front of a house, on a city street, in a garage, on a bridge, in the snow, near a beach, on a dirt track
[boats] pairs
nouns: boat, sailboat, canoe, kayak, yacht, fishing boat, ferry, rowboat, ship, cargo ship
adjs: small, white, red, blue, old, wooden, rusty, large, abandoned, colorful
scenes: in a harbor, on a calm lake, at sea, on a river, tied to a dock, near the shore, on the beach
[aircraft]
nouns: airplane, helicopter, hot air balloon, jet, glider, seaplane
adjs: white, red, small, large, old, vintage, silver, colorful
scenes: in a clear sky, above the clouds, on a runway, over the mountains, over a city, at an airport, above the sea
[furniture] pairs
nouns: chair, table, desk, sofa, bench, bookshelf, cabinet, stool, bed, dresser, armchair, rocking chair
adjs: wooden, old, antique, modern, broken, white, black, red, blue, green, grey, small, large, dusty, empty
scenes: @objects
[tableware] pairs
nouns: mug, cup, teapot, bowl, plate, vase, jar, bottle, jug, pitcher
adjs: ceramic, glass, white, blue, red, yellow, cracked, chipped, empty, old, tiny, handmade, painted, striped,
  spotted
scenes: @objects
[bags] pairs
nouns: backpack, suitcase, handbag, basket, box, bucket, wallet, crate, tote bag
adjs: leather, old, red, blue, black, brown, empty, heavy, worn, plastic, small, large, open
scenes: @objects
[devices] pairs
nouns: laptop, phone, camera, television, radio, keyboard, clock, lamp, speaker, computer mouse, calculator,
  typewriter
adjs: old, new, broken, vintage, black, white, silver, dusty, tiny, modern, cracked
scenes: @objects
[tools] pairs
nouns: hammer, wrench, saw, shovel, axe, screwdriver, ladder, rake, drill, paintbrush, watering can
adjs: old, rusty, new, wooden, metal, heavy, small, large, red, yellow, muddy, worn
scenes: @objects
[clothes] pairs
nouns: shoe, boot, hat, scarf, glove, jacket, sweater, dress, umbrella, tie, belt, sneaker
adjs: red, blue, green, yellow, black, white, grey, orange, purple, pink, brown, striped, checkered, wet, muddy, old,
  new, torn
scenes: @objects
[toys and instruments] pairs
nouns: teddy bear, ball, kite, toy car, doll, balloon, candle, book, pillow, blanket, guitar, piano, violin, drum,
  trumpet, cello, accordion, skateboard, surfboard
adjs: old, small, large, red, blue, yellow, green, worn, new, colorful, dusty, brand new
scenes: @objects
[fruit and vegetables] pairs
nouns: apple, banana, orange, lemon, pear, peach, strawberry, pineapple, watermelon, tomato, carrot, potato, onion,
  cucumber, pepper, pumpkin, avocado, mango, cabbage, kiwi, coconut, eggplant, zucchini
adjs: ripe, fresh, sliced, green, red, yellow, small, large, half-eaten, peeled, rotten, shiny
scenes: in a wooden bowl, in a basket, at a market stall, on a kitchen counter, on a cutting board, on a white
  background, on the grass, in a grocery store
[dishes] pairs
nouns: pizza, sandwich, burger, cake, pie, bowl of soup, salad, pancake, croissant, muffin, cupcake, donut, taco,
  burrito, hot dog, loaf of bread, plate of pasta, steak, omelette, bagel, waffle, cookie, bowl of rice
adjs: homemade, fresh, hot, half-eaten, delicious, large, small, cold, warm, messy
scenes: on a plate, on a wooden table, on a cutting board, at a market stall, on a picnic blanket, in a lunch box, on
  a kitchen counter, in a bakery display, on a restaurant table, next to a cup of coffee
[plants] pairs
nouns: oak tree, pine tree, palm tree, willow tree, maple tree, apple tree, birch tree, sunflower, rose, tulip, daisy,
  cactus, fern, orchid, lily, bush, hedge, mushroom, bonsai tree, houseplant, lavender bush, bamboo plant
adjs: tall, small, young, old, blooming, wilted, lone, leafy, green, tiny, giant, wild
scenes: in a garden, in a field, on a hillside, by the road, in a greenhouse, on a windowsill, in a park, in a forest
  clearing, next to a fence, in a courtyard, on a riverbank, in the desert
[buildings] pairs
nouns: house, barn, church, lighthouse, castle, bridge, skyscraper, cabin, windmill, tower, temple, farmhouse,
  cottage, factory, stadium, train station, shop, cafe, school, hospital, apartment building, mosque, palace, clock
  tower, gazebo
adjs: old, abandoned, stone, brick, wooden, modern, tall, small, ruined, colorful, white, red, historic, crumbling,
  empty, snow-covered
scenes: in a small village, on a hill, by the sea, in a busy city, in the mountains, next to a river, in the
  countryside, on a quiet street, at the end of a road, surrounded by trees, on a cliff, in a snowy valley, behind a
  fence, in a town square
[landscapes]
nouns: mountain lake, sandy beach, desert, pine forest, waterfall, canyon, meadow, river valley, glacier, volcano,
  marsh, jungle, coral reef, city skyline, harbor, country road, snowy field, cave entrance, tropical island, wheat
  field, vineyard, rocky coastline, frozen lake, bamboo forest, sand dune, rice terrace, lavender field, hot spring,
  mountain pass, swamp, cliff, waterfront
adjs: misty, quiet, empty, rocky, frozen, sunny, green, wild, calm, remote, vast, peaceful, dry, crowded, stormy,
  beautiful, deserted
[rooms]
nouns: kitchen, living room, classroom, library, office, restaurant, subway station, bedroom, gym, supermarket aisle,
  bathroom, hotel lobby, workshop, museum hall, attic, hospital corridor
adjs: cluttered, empty, tidy, modern, old-fashioned, crowded, messy, cozy, dark, bright, spacious, small
"""

TEMPLATES = (
    "{style} of {subj}",
    "{style} of {subj} {scene}",
    "{subj} {scene}",
    "{subj} {scene} {light}",
    "{style} of {subj} {scene} {light}",
    "{subj} {scene}, {view}",
    "{style} of {subj} {light}",
    "{subj} {light}",
    "{subj}, {view}",
    "{noun_a} and {other} {scene}",
    "{style} of {noun_a} and {other}",
    "{subj} {action} {scene}",
    "{subj} {action} {scene} {light}",
    "{style} of {subj} {action}",
    "{style} of {subj} {action} {scene}",
    "{subj} {action}, {view}",
    "{subj} wearing {garment} {scene}",
    "{subj} wearing {garment} {action} {scene}",
    "{style} of {subj} wearing {garment}",
)


def _article(phrase: str) -> str:
    """``"a "`` or ``"an "`` + phrase, by how the first word sounds."""
    word = phrase.split()[0].lower()
    vowel = word[0] in "aeiou" and not word.startswith(("uni", "use", "eu", "one"))
    return ("an " if vowel or word.startswith(("hour", "honest")) else "a ") + phrase


def _pick(items: list[str], *key: object) -> str:
    """A deterministic pseudo-random item: sha256 of the seed and the key, modulo the length."""
    digest = hashlib.sha256(":".join(map(str, (SEED, *key))).encode()).digest()
    return items[int.from_bytes(digest[:8], "big") % len(items)]


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _classes() -> list[dict[str, list[str]]]:
    """Parse :data:`CLASSES_TEXT` into ``{"nouns", "adjs", "action", "scene", "templates"}`` dicts."""
    classes: list[dict[str, list[str]]] = []
    for block in CLASSES_TEXT.split("\n[")[1:]:
        title, _, rest = block.partition("\n")
        flags = title.partition("]")[2].split()
        items = dict(line.split(": ", 1) for line in rest.replace("\n  ", " ").splitlines() if line.strip())
        items = {k: OBJECT_SCENES if v == "@objects" else v for k, v in items.items()}
        cls = {"nouns": _split(items["nouns"]), "adjs": _split(items["adjs"])}
        cls |= {"action": _split(items.get("actions", "")), "scene": _split(items.get("scenes", ""))}
        have = {"style", "light", "view", "subj", "noun_a"} | {k for k in ("action", "scene") if cls[k]}
        have |= {"other" if flag == "pairs" else flag for flag in flags}
        cls["templates"] = [t for t in TEMPLATES if _fields(t) <= have]
        classes.append(cls)
    return classes


def descriptions(n: int = N_DESCRIPTIONS) -> list[str]:
    """``n`` distinct image descriptions composed from :data:`CLASSES_TEXT` and :data:`TEMPLATES`."""
    classes = _classes()
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        if i > 50 * n:
            raise RuntimeError(f"only {len(out)} distinct descriptions after {i} draws")
        cls = classes[i % len(classes)]
        noun = _pick(cls["nouns"], i, "noun")
        adj = _pick(cls["adjs"], i, "adj")
        values = {
            "style": _article(_pick(STYLES, i, "style")),
            "light": _pick(LIGHTS, i, "light"),
            "view": _pick(VIEWS, i, "view"),
            # one subject in five goes without an adjective
            "subj": _article(noun if _pick(list(range(5)), i, "bare") == 0 else f"{adj} {noun}"),
            "noun_a": _article(noun),
            "other": _article(_pick([x for x in cls["nouns"] if x != noun], i, "other")),
            "action": _pick(cls["action"], i, "action") if cls["action"] else "",
            "scene": _pick(cls["scene"], i, "scene") if cls["scene"] else "",
            "garment": _article(f"{_pick(GARMENT_ADJS, i, 'gadj')} {_pick(GARMENTS, i, 'garment')}"),
        }
        text = _pick(cls["templates"], i, "template").format(**values)
        i += 1
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


# ---------------------------------------------------------------- the "words" pool, by category
# "category: word word ..." lines; indented lines continue the category above.
WORDS_TEXT = """
animals: dog cat horse cow pig sheep goat chicken duck goose turkey rabbit mouse rat hamster squirrel fox wolf bear
  lion tiger leopard cheetah jaguar panther elephant giraffe zebra hippo rhino camel llama alpaca donkey mule deer
  moose elk reindeer antelope gazelle buffalo bison yak kangaroo koala wombat platypus panda monkey gorilla chimpanzee
  orangutan baboon lemur sloth armadillo anteater hedgehog porcupine skunk raccoon badger otter beaver weasel ferret
  mole bat opossum lynx bobcat cougar hyena jackal coyote meerkat mongoose chipmunk gopher lizard gecko iguana
  chameleon snake python cobra viper turtle tortoise crocodile alligator frog toad salamander newt puppy kitten calf
  foal lamb piglet pony stallion bull ox boar hare collie spaniel chihuahua greyhound
birds: bird eagle hawk falcon owl parrot pigeon dove sparrow robin crow raven magpie jay finch canary swallow swift
  wren starling blackbird thrush seagull gull albatross pelican heron crane stork flamingo swan penguin ostrich emu
  peacock pheasant quail woodpecker hummingbird kingfisher toucan vulture condor cardinal goldfinch cuckoo puffin
  cormorant duckling chick rooster hen feather nest wing beak mallard partridge grouse lark nightingale oriole macaw
  cockatoo budgie
sea creatures: fish shark whale dolphin seal walrus octopus squid jellyfish starfish crab lobster shrimp prawn oyster
  clam mussel scallop snail slug seahorse stingray eel salmon trout tuna cod goldfish carp coral sponge urchin shell
  fin manatee narwhal orca barracuda sardine anchovy herring mackerel halibut piranha catfish minnow tadpole krill
insects: insect bug ant bee wasp hornet fly mosquito butterfly moth beetle ladybug dragonfly grasshopper cricket
  cockroach termite caterpillar worm spider scorpion centipede millipede tick flea firefly cocoon web hive aphid gnat
  weevil mantis cicada earwig larva maggot
plants: tree bush shrub flower rose tulip daisy lily orchid sunflower lavender poppy daffodil dandelion violet iris
  lotus jasmine magnolia carnation marigold peony cactus fern moss grass weed reed ivy vine bamboo palm oak pine maple
  birch willow cedar spruce fir elm cypress redwood mushroom leaf branch twig trunk root seed acorn pinecone petal
  stem thorn bark hedge clover seaweed algae bouquet hibiscus begonia geranium hyacinth azalea heather thistle nettle
  shamrock holly mistletoe wisteria sapling stump log
fruits: apple banana orange lemon lime grapefruit pear peach plum apricot cherry grape strawberry raspberry blueberry
  blackberry cranberry melon watermelon pineapple mango papaya kiwi coconut fig date pomegranate avocado tangerine
  nectarine lychee guava
vegetables: carrot potato tomato onion garlic cabbage lettuce spinach broccoli cauliflower cucumber pepper pumpkin
  squash zucchini eggplant celery asparagus radish beet turnip corn pea bean leek kale artichoke ginger olive chili
food: bread toast sandwich burger pizza pasta spaghetti noodle rice soup stew salad steak sausage bacon ham egg
  omelette pancake waffle cereal oatmeal porridge cheese butter yogurt cream cake pie cookie biscuit muffin cupcake
  donut croissant bagel pretzel popcorn chocolate candy lollipop dessert pudding jelly jam honey sugar salt flour
  dumpling sushi taco burrito curry kebab fries chips cracker nut almond peanut walnut cashew tofu meal muesli granola
  lasagna risotto ravioli paella quiche casserole meatball nacho salsa ketchup mustard mayonnaise vinegar sauce gravy
  syrup caramel marshmallow brownie tart scone baguette bun pickle hummus falafel crepe toffee fudge
drinks: water milk juice coffee tea lemonade soda beer wine whiskey cocktail smoothie milkshake cocoa espresso cider
  champagne vodka rum gin latte cappuccino broth
kitchen: plate bowl cup mug glass jug pitcher teapot kettle pan pot skillet wok spoon fork knife chopsticks spatula
  ladle whisk grater colander sieve blender toaster microwave oven stove fridge refrigerator freezer dishwasher sink
  faucet tray napkin tablecloth apron jar bottle can lid corkscrew cutlery saucer bucket basket thermos lunchbox
  canister cookbook funnel mortar pestle tongs peeler
furniture: chair table desk sofa couch armchair stool bench bed mattress crib hammock cabinet cupboard wardrobe
  dresser drawer bookshelf shelf bookcase nightstand ottoman footstool recliner futon headboard
household: lamp lantern candle clock mirror curtain blind rug carpet pillow cushion blanket quilt towel sheet vase
  frame picture painting poster window door doorbell key lock fan heater radiator fireplace chimney broom mop vacuum
  soap shampoo toothbrush toothpaste comb brush razor bathtub shower toilet laundry hanger iron box crate bin bag
  envelope rope string tape glue scissors needle thread button zipper umbrella doormat wastebasket coaster ashtray
  bookmark keychain thermostat padlock hinge doorknob handle
tools: hammer nail screw screwdriver wrench pliers saw drill axe hatchet chisel shovel spade rake hoe ladder
  wheelbarrow hose sprinkler trowel toolbox bolt chain hook magnet crowbar mallet anvil sandpaper paintbrush roller
  flashlight battery wire cable plug socket switch pitchfork sickle scythe stopwatch thermometer tweezers clamp vise
  compass
clothing: shirt blouse sweater hoodie jacket coat vest dress skirt trousers pants jeans shorts suit tie scarf hat cap
  beanie helmet glove mitten sock shoe boot sneaker sandal slipper heel belt uniform raincoat pajamas robe bikini
  swimsuit overalls cardigan tuxedo gown kimono sari poncho collar sleeve pocket blazer parka tracksuit leggings
  turtleneck bandana headband earmuffs loafer moccasin clog
accessories: handbag purse wallet backpack suitcase briefcase watch bracelet necklace ring earring brooch glasses
  sunglasses goggles mask crown tiara badge medal ribbon bow
body: face head hair eye ear nose mouth lip tooth tongue chin cheek forehead eyebrow neck shoulder arm elbow wrist
  hand finger thumb chest back belly waist hip leg knee ankle foot toe skin beard mustache arms legs skull bone
people: man woman child boy girl baby toddler teenager adult person human family couple crowd friend mother father
  brother sister grandmother grandfather
occupations: doctor nurse teacher student chef cook baker butcher farmer fisherman firefighter policeman soldier
  sailor pilot astronaut driver mechanic carpenter plumber electrician painter artist musician singer dancer actor
  photographer writer scientist engineer lawyer judge waiter waitress cashier clerk librarian gardener miner builder
  athlete player coach referee surgeon dentist barber tailor
vehicles: car truck bus van taxi jeep tractor motorcycle scooter bicycle bike tricycle train tram subway locomotive
  wagon cart carriage boat ship yacht sailboat canoe kayak raft ferry submarine airplane plane jet helicopter glider
  balloon rocket ambulance limousine skateboard sled snowmobile trailer bulldozer excavator forklift wheel tire
  minivan hatchback sedan convertible caravan steamroller blimp airship hovercraft gondola catamaran dinghy
buildings: house home cottage cabin hut shed barn farmhouse mansion palace castle tower skyscraper apartment church
  chapel cathedral temple mosque pagoda shrine school university hospital library museum theater cinema stadium arena
  station airport harbor port factory warehouse mill windmill lighthouse bridge tunnel dam fountain statue monument
  gate fence wall roof balcony porch garage attic basement cellar staircase elevator hallway kitchen bedroom bathroom
  office classroom restaurant cafe bakery shop store market mall supermarket pharmacy bank hotel motel prison
places: sea ocean lake river stream pond waterfall beach shore coast island bay lagoon cliff cave mountain hill valley
  canyon volcano glacier iceberg desert dune oasis forest jungle woods meadow field prairie savanna swamp marsh bog
  plain plateau ridge peak slope rock boulder pebble sand mud soil dirt clay city town village street road highway
  path trail alley park garden yard playground farm orchard vineyard ranch zoo countryside sky cloud sun moon star
  rainbow horizon land trees leaves plaza courtyard cemetery pier dock wharf marina quay campsite tent canal ditch
  creek estuary delta fjord reef crater geyser hilltop riverbank seaside lawn pasture greenhouse
weather: rain snow hail fog mist storm thunder lightning wind tornado hurricane frost ice puddle flood wave tide fire
  flame smoke ash dust steam sunlight shadow sunset sunrise dawn dusk night
materials: wood metal steel copper brass bronze silver gold aluminum tin plastic rubber leather paper cardboard cloth
  fabric cotton wool silk linen velvet denim lace satin nylon polyester chiffon suede fur stone marble granite
  concrete brick ceramic porcelain wax wicker straw cork crystal diamond pearl ivory
colours: red yellow green blue purple pink brown black white gray grey beige tan turquoise teal navy maroon crimson
  scarlet magenta lilac indigo cyan khaki charcoal amber ruby emerald sapphire color colorful
textures: rough smooth soft hard furry fluffy fuzzy hairy silky sleek slimy sticky spiky prickly bumpy glossy shiny
  matte dull wet dry oily greasy grainy sandy muddy dusty rusty crumpled wrinkled creased cracked frayed woven knitted
  quilted texture coarse velvety rubbery leathery scaly feathery crisp crunchy metallic transparent translucent opaque
  pale vivid faded curly wavy solid liquid juicy sour sweet bitter salty spicy crispy creamy fragrant smelly golden
  wooden
patterns: spotted striped dotted checkered plaid tartan floral paisley camouflage pattern zigzag herringbone speckled
  mottled marbled
shapes: circle square triangle rectangle oval heart cube sphere cone cylinder pyramid hexagon octagon pentagon spiral
  arch curve line dot round triangular rectangular circular curved straight pointed flat hollow shape
sizes: big small large tiny huge giant enormous little tall short long wide narrow thick thin deep shallow heavy light
  fat slim skinny massive miniature
condition: old new young ancient modern antique vintage fresh ripe rotten broken damaged torn worn clean dirty messy
  tidy empty full open closed frozen melted burnt cooked raw boiled fried baked plain
weather adjectives: hot cold warm cool icy bright dark dim sunny cloudy rainy snowy foggy windy stormy misty shadowy
  glowing sparkling
states: happy sad angry tired sleepy hungry bored scared curious calm busy quiet noisy loud silent smiling laughing
  crying sleeping running walking sitting standing jumping swimming flying eating drinking reading writing
sports: ball football soccer basketball baseball tennis golf hockey volleyball rugby racket net goal hoop puck skate
  ski snowboard surfboard paddle frisbee dumbbell treadmill trophy javelin discus baton saddle bridle horseshoe
  dartboard dart arrow quiver target
music: guitar piano violin cello harp flute trumpet trombone saxophone clarinet drum tambourine accordion banjo
  ukulele harmonica microphone speaker headphones xylophone organ bagpipes oboe bassoon tuba mandolin sitar gong
  cymbal bell
toys: toy doll teddy puppet kite puzzle block dice card chess domino rattle whistle bubble robot swing slide seesaw
  sandbox
electronics: computer laptop tablet phone smartphone television radio camera keyboard monitor screen printer charger
  router remote calculator projector console joystick headset antenna satellite drone webcam modem microchip
office: pen pencil crayon marker eraser ruler notebook book magazine newspaper letter map globe calendar folder binder
  stapler paperclip chalk blackboard whiteboard textbook dictionary diary sticker label stamp postcard ticket coin
  banknote receipt
"""


def words() -> list[tuple[str, list[str]]]:
    """``[(category, words), ...]``: each word listed once, under the first category that names it."""
    seen: set[str] = set()
    out = []
    for line in WORDS_TEXT.replace("\n  ", " ").strip().splitlines():
        category, _, text = line.partition(": ")
        out.append((category, [w for w in text.split() if not (w in seen or seen.add(w))]))
    return out


# ---------------------------------------------------------------- rendering and writing
def _body(name: str) -> tuple[list[str], list[str]]:
    """``(texts, file lines after the header)`` of one pool."""
    if name == "descriptions":
        texts = descriptions()
        return texts, texts
    if name == "words":
        texts, lines = [], []
        for category, ws in words():
            lines += [f"# category: {category}", *ws]
            texts += ws
        return texts, lines
    group, _, key = name.partition("/")
    texts = list({"feature": FEATURE_SETS, "waterbirds": WATERBIRDS_TEXTS}[group][key])
    return texts, texts


def render_pools() -> dict[str, tuple[str, list[str]]]:
    """``{file name: (file contents, texts)}`` for every pool of :data:`POOLS`."""
    out = {}
    for name, info in POOLS.items():
        texts, lines = _body(name)
        if len(set(texts)) != len(texts) or any(not t or t != t.strip() or t.startswith("#") for t in texts):
            raise AssertionError(f"pool {name}: texts must be distinct, stripped, non-empty, not starting with '#'")
        out[info.file] = ("\n".join([pool_header(name, info.version, info.description), *lines]) + "\n", texts)
    return out


def write_pools(outdir: str | Path) -> dict[str, tuple[int, str]]:
    """Write every pool file into ``outdir``; returns ``{file name: (size, sha256 of the texts)}``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for file, (content, texts) in render_pools().items():
        (outdir / file).write_bytes(content.encode("utf-8"))
        summary[file] = (len(texts), texts_sha256(texts))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m vitdecomp.interpret.text.make_pools OUTDIR", file=sys.stderr)
        return 2
    for file, (size, sha) in write_pools(argv[0]).items():
        print(f"{file:28s} {size:5d}  {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

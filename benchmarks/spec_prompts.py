"""Prompt sets of benchmarks/spec_decode.py.

LOOKUP: chat requests whose answer repeats a passage given in the prompt (150-400 prompt
tokens): fix a typo in code and return the code, rewrite a text with one name changed, copy-edit
an email, change one value of a config file, quote sentences, renumber a list. N-gram prompt
lookup finds most of the answer in the prompt. STORY: free story writing, where the answer has
next to nothing to look up.
"""

from __future__ import annotations

_CODE_PY = '''import csv
from collections import defaultdict


def load_orders(path):
    """Read orders.csv and return a list of dicts with typed fields."""
    orders = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            orders.append({
                "id": int(row["id"]),
                "customer": row["customer"].strip(),
                "amount": float(row["amount"]),
                "country": row["country"].upper(),
            })
    return orders


def totals_by_country(orders):
    """Sum the order amounts per country, largest first."""
    totals = defaultdict(float)
    for order in orders:
        totals[order["country"]] += order["amount"]
    return sorted(totals.items(), key=lambda item: item[1], reverse=True)


def top_customers(orders, n=3):
    """The n customers who spent the most."""
    spent = defaultdict(float)
    for order in ordres:
        spent[order["customer"]] += order["amount"]
    ranked = sorted(spent.items(), key=lambda item: item[1], reverse=True)
    return ranked[:n]
'''

_CODE_JS = '''function parseQuery(url) {
  var query = {};
  var start = url.indexOf("?");
  if (start === -1) {
    return query;
  }
  var pairs = url.slice(start + 1).split("&");
  for (var i = 0; i < pairs.length; i++) {
    var pair = pairs[i].split("=");
    var key = decodeURIComponent(pair[0]);
    var value = pair.length > 1 ? decodeURIComponent(pair[1]) : "";
    if (query[key] === undefined) {
      query[key] = value;
    } else if (Array.isArray(query[key])) {
      query[key].push(value);
    } else {
      query[key] = [query[key], value];
    }
  }
  return query;
}

function buildQuery(params) {
  var parts = [];
  for (var key in params) {
    var value = params[key];
    parts.push(encodeURIComponent(key) + "=" + encodeURIComponent(value));
  }
  return parts.join("&");
}
'''

_BAKERY = (
    "Martha opened her bakery on the corner of Elm Street in the spring of 1998. Every "
    "morning she arrived at four o'clock, lit the old brick oven and started the first batch "
    "of sourdough while the street was still dark. By seven there was a line outside the "
    "door: nurses coming off the night shift, students on their way to the university and "
    "the bus drivers who parked their buses across the road. Martha knew most of them by "
    "name and many by their order. She never wrote anything down. When the flour mill in "
    "the valley closed in 2006, Martha drove two hours each week to buy flour from a farm "
    "in the hills, because she said the bread tasted of the place its wheat came from. In "
    "2015 her nephew Daniel joined her, and together they added a small room at the back "
    "where children could watch the dough being shaped through a window. Martha retired in "
    "2021, but she still comes in on Saturdays to bake the rye loaves that nobody else can "
    "get quite right."
)

_EMAIL = (
    "Dear Mr. Thompson,\n\n"
    "Thank you for your letter of 12 March regarding the delivery of the new office "
    "furniture. I am sorry to here that two of the desks arrived damaged and that the "
    "chairs were delivered to the wrong floor. I have spoken with our logistics team, and "
    "they have confirmed that a replacement for both desks will be shipped on Monday. Our "
    "driver will call you in the morning to aggree on a time that suits you, and he will "
    "carry the chairs to the third floor at no additional cost.\n\n"
    "As an apology for the inconvenience, we would like to offer you a discount of ten "
    "percent on your next order. The discount will be applied automaticaly when you use "
    "your customer number at checkout. If the new desks show any damage on arrival, please "
    "do not sign the delivery note and contact me directly at the number below.\n\n"
    "Once again, please accept our apologies. We value your buisness and look forward to "
    "serving you in the future.\n\n"
    "Kind regards,\n"
    "Sarah Collins\n"
    "Customer Service Manager\n"
)

_CONFIG = '''server:
  host: 0.0.0.0
  port: 8080
  workers: 4
  timeout_seconds: 30
  max_body_size_mb: 16

database:
  driver: postgres
  host: db.internal
  port: 5432
  name: inventory
  user: inventory_app
  pool_size: 10
  ssl: true

cache:
  backend: redis
  host: cache.internal
  port: 6379
  ttl_seconds: 300

logging:
  level: info
  format: json
  file: /var/log/inventory/app.log
  rotate_daily: true
  keep_days: 14

features:
  enable_search: true
  enable_export: false
  enable_audit_log: true
'''

_BRIDGE = (
    "The old stone bridge over the river Lenne was built between 1784 and 1791. Its "
    "builders first drove oak piles into the riverbed to carry the weight of the piers. "
    "The piers themselves were made of sandstone blocks cut in a quarry three miles "
    "upstream and floated down on rafts. Each of the five arches was raised on a wooden "
    "frame, called a centering, which was removed once the keystone had been set. The "
    "mortar was mixed with volcanic ash brought from the Eifel, which let it harden even "
    "under water. In 1845 the bridge survived a flood that destroyed every other crossing "
    "on the river. During the war one arch was blown up, and it was rebuilt in 1949 with "
    "concrete faced with the original stones. Today only pedestrians and cyclists may use "
    "the bridge, and a small museum in the former toll house tells the story of its "
    "construction."
)

_LIST = (
    "- Check the tyre pressure, including the spare wheel.\n"
    "- Top up the windscreen washer fluid.\n"
    "- Make sure the first aid kit is complete and not expired.\n"
    "- Pack a warm blanket, a torch and spare batteries.\n"
    "- Download offline maps for the whole route.\n"
    "- Put the vehicle documents and insurance papers in the glove box.\n"
    "- Check the oil level and the coolant level with the engine cold.\n"
    "- Test the headlights, brake lights and indicators.\n"
    "- Charge the phone and pack a car charger.\n"
    "- Plan a break every two hours of driving.\n"
)

_RIVER = (
    "Rivers shape the land they flow through in three main ways. In their upper course, "
    "close to the source, they are steep and fast, and they cut downwards into the rock, "
    "carving narrow valleys with steep sides. Waterfalls form where a band of hard rock "
    "lies above softer rock: the soft rock is worn away more quickly, the hard rock is "
    "undercut and finally collapses, and the waterfall slowly moves upstream. In the "
    "middle course the river is wider and carries more water, and it starts to erode "
    "sideways, forming bends called meanders. On the outside of each bend the water flows "
    "faster and wears away the bank, while on the inside it slows down and drops sand and "
    "gravel. In the lower course, near the sea, the river is wide and slow. It deposits "
    "fine mud on its floodplain whenever it bursts its banks, and at its mouth it may "
    "build a delta."
)

LOOKUP = [
    "Fix the typo in the following Python code. Reply with the complete corrected code and "
    "nothing else.\n\n```python\n" + _CODE_PY + "```",
    "Rewrite the following passage exactly as it is, but change the name Martha to Louise "
    "everywhere.\n\n" + _BAKERY,
    "Correct the spelling mistakes in this email and reply with the full corrected email.\n\n"
    + _EMAIL,
    "In the following configuration file, change the server port from 8080 to 9090. Reply "
    "with the complete updated file.\n\n```yaml\n" + _CONFIG + "```",
    "Replace every `var` with `let` in this JavaScript code and reply with the whole "
    "code.\n\n```javascript\n" + _CODE_JS + "```",
    "Quote, word for word, the sentences of this text that describe how the bridge was "
    "built.\n\n" + _BRIDGE,
    "Turn this checklist into a numbered list. Keep the text of every item unchanged.\n\n"
    + _LIST,
    "Summarize the following passage, reusing its own wording as much as possible.\n\n"
    + _RIVER,
]

STORY = [
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "Write a short story about a dragon who is afraid of flying.",
    "Tell a story about two friends who get lost in a city they have never visited.",
    "Write a fairy tale about a clockmaker who can stop time for one minute a day.",
    "Write a story about a robot that wants to become a gardener.",
    "Tell a bedtime story about a cat who sails across the ocean.",
    "Write a mystery story set on a night train through the mountains.",
    "Write a story about a girl who discovers a door in the back of her wardrobe.",
]

SETS = {"lookup": LOOKUP, "story": STORY}

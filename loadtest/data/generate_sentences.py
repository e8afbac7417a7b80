#!/usr/bin/env python3
"""Writes sentences.txt: 1,000 conversational sentences of varied length, built
deterministically from templates (no external data), for embedding and load benchmarks."""
import random

random.seed(20261121)
names = ["Caroline", "Melanie", "Jon", "Gina", "Priya", "Tomás", "Aiko", "Dev", "Lena", "Omar",
         "Sofia", "Marcus", "Hana", "Ravi", "Elena", "Kwame", "Noor", "Felix", "Ines", "Yuki"]
pets = ["a cat named Miso", "a beagle called Rex", "two goldfish", "a rescue greyhound",
        "a parrot that talks too much", "a tortoise named Sheldon", "a very old tabby"]
places = ["Lisbon", "the lake house", "Kyoto", "my sister's place in Denver", "the climbing gym",
          "the farmers market", "Berlin", "the library downtown", "a cabin near Lake Tahoe", "Nairobi"]
activities = ["painting a sunrise", "training for a half marathon", "learning the cello",
              "volunteering at the shelter", "baking sourdough", "writing a short story",
              "fixing up an old bike", "studying for the nursing exam", "planting tomatoes",
              "going to a pottery class", "teaching my kids to swim", "reading about black holes"]
times = ["yesterday", "last week", "on Saturday morning", "in May 2023", "two years ago",
         "last summer", "this evening", "over the holidays", "on my birthday", "a few days ago"]
feelings = ["really proud", "a bit nervous", "exhausted but happy", "so relieved", "kind of stuck",
            "grateful", "overwhelmed", "excited"]
foods = ["ramen", "my grandmother's lentil soup", "spicy tacos", "fresh mango", "dark chocolate",
         "pad thai", "homemade pizza"]
jobs = ["a nurse on night shifts", "a software engineer", "a high school teacher", "a counselor",
        "a freelance photographer", "a bakery owner", "a paramedic"]
templates = [
    "I adopted {pet} {time}.",
    "{name} and I went to {place} {time} and it was lovely.",
    "I've been {activity} and I feel {feeling} about it.",
    "My favourite food is {food}, especially when it's cold outside.",
    "I work as {job}, so my schedule is all over the place.",
    "{time} I was {activity} with {name}.",
    "Did you ever try {food}? I had it at {place} {time}.",
    "Honestly I feel {feeling} since I started {activity}.",
    "We're planning a trip to {place} next month, {name} is coming too.",
    "{name} told me she has {pet} now, which surprised me.",
    "I finally finished {activity} {time}, it took forever!",
    "My therapist suggested {activity} to help with stress and it kind of works.",
    "Remember when we talked about {place}? I went there {time}.",
    "I'm {feeling} because {name} got a job as {job}.",
    "The best part of my week was {activity} at {place}.",
    "Can you remind me what {name} said about {food}?",
    "{time} my kids and I spent the whole afternoon {activity}, and then we had {food} for dinner at {place}.",
    "I keep thinking about moving to {place}; {name} says it's a great city for someone who works as {job}.",
    "Thanks!",
    "That sounds amazing, tell me more.",
    "Wow, good for you!",
    "I'm not sure yet, I'll let you know.",
    "{name} and I have been friends since school, and {time} we finally went to {place} together after talking about it for years.",
]
seen = set()
with open("sentences.txt", "w", encoding="utf-8") as out:
    while len(seen) < 1000:
        sentence = random.choice(templates).format(
            name=random.choice(names), pet=random.choice(pets), place=random.choice(places),
            activity=random.choice(activities), time=random.choice(times),
            feeling=random.choice(feelings), food=random.choice(foods), job=random.choice(jobs))
        sentence = sentence[0].upper() + sentence[1:]
        if sentence in seen:
            sentence = f"{sentence} ({len(seen)})"
        seen.add(sentence)
        out.write(sentence + "\n")

"""Words shared by several corpus domains and by the retrieval probes.

Days (the probes' keys) and names (their values) are single BPE tokens whatever the vocabulary:
they are frequent in several domains.
"""
NAMES = ("Alice", "Bruno", "Chen", "Dana", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Kofi", "Lena", "Mara", "Nils", "Omar", "Priya", "Ravi", "Sofia", "Tomas", "Yuki")
TOWNS = ("Lindenfeld", "Port Avery", "Kessington", "Marrow Bay", "Oldcastle", "Riverton",
         "Stonebridge", "Westholm")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

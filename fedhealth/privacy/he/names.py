"""The names encrypted aggregation uses on the wire: message types, actions, record keys.

Free of imports, so the site's ClientApp can route messages without loading TenSEAL (a
deployed site starts a process per message; see ``fedhealth.privacy.he.wire``).
"""

DECRYPT_ACTION = "decrypt"
DECRYPT_MESSAGE_TYPE = f"query.{DECRYPT_ACTION}"
IDENTIFY_ACTION = "identify"
IDENTIFY_MESSAGE_TYPE = f"query.{IDENTIFY_ACTION}"
CONTRIBUTION_RECORD = "he-contribution"
REQUEST_RECORD = "he-request"
ANSWER_RECORD = "he-aggregate"
ANSWER_ARRAY = "aggregate"

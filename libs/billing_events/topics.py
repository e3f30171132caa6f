"""Topic names (DESIGN.md section 3). Keys keep per-account order."""

USAGE_RAW = "billing.usage.raw"  # key: tenant id
USAGE_ACCEPTED = "billing.usage.accepted"  # key: billing account id
USAGE_REJECTED = "billing.usage.rejected"  # key: billing account id (or tenant when unknown)
PAYMENTS = "billing.payments"  # key: billing account id
LEDGER_COMMANDS = "billing.ledger.commands"  # key: billing account id
LEDGER_EVENTS = "billing.ledger.events"  # key: aggregate id

ALL_TOPICS = (USAGE_RAW, USAGE_ACCEPTED, USAGE_REJECTED, PAYMENTS, LEDGER_COMMANDS, LEDGER_EVENTS)

# Header carrying the schema version of the message model (also present as a field in the body).
SCHEMA_HEADER = "schema"

# The largest record a topic takes, key, value, headers and the record batch around it together: Kafka's defaults
# (the broker's message.max.bytes, 1,048,588, is the batch of one record; the producer's max.request.size 1 MiB),
# which deploy/ leaves as they are. A catalogue is bounded so that it fits as a command and as the ledger's event
# (``billing_events.catalog.CATALOG_DOCUMENT_BYTES_MAX``); every other message is a few KB at most.
RECORD_BYTES_MAX = 1_048_576

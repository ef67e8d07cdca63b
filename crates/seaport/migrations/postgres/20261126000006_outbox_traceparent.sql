-- The W3C trace context of the event (its CloudEvents `traceparent` extension), kept beside the
-- envelope so the relay can send it as a message header without parsing the payload.
ALTER TABLE seaport_outbox ADD COLUMN traceparent TEXT;

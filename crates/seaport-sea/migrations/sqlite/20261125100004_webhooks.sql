-- Webhook deliveries already accepted, per source and the provider's delivery id (Stripe event
-- id, X-GitHub-Delivery, webhook-id): a redelivery is answered 200 and stored nothing new.
-- Written in the same transaction as the WebhookReceived event in the outbox.
CREATE TABLE webhook_deliveries (
    source       TEXT NOT NULL,
    delivery_id  TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    received_at  TEXT NOT NULL,
    PRIMARY KEY (source, delivery_id)
);

-- 002: the event pipeline (docs/events.md): leases, consumer dedupe, settlement, DLQ and parking, reconciliation.
-- Every statement is idempotent (see 001). Money tables are append-only, enforced by triggers like ledger_entry.

-- A named lease (relay, reconcile schedule): the holder renews it before expires_at; anyone may take an expired one.
-- Times are MariaDB's UTC_TIMESTAMP(6), so nodes with skewed clocks agree. `slot` records the last hourly
-- reconciliation claimed, so exactly one node runs each hour.
CREATE TABLE IF NOT EXISTS lease (
    name        VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    owner       VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    expires_at  DATETIME(6) NOT NULL,
    slot        VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL,
    PRIMARY KEY (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Consumer dedupe: an event id is inserted in the same transaction as its effect, so a redelivery applies nothing.
CREATE TABLE IF NOT EXISTS processed_event (
    event_id      CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    payment_id    BIGINT UNSIGNED NOT NULL,
    topic         VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    `sequence`    INT NOT NULL,
    processed_at  DATETIME(6) NOT NULL,
    PRIMARY KEY (event_id),
    KEY ix_processed_payment (payment_id, `sequence`),
    KEY ix_processed_at (processed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per capture (kind CAPTURE, positive) and per refund after settlement (kind ADJUSTMENT, negative).
-- operation_id is the payment_operation that caused it, unique per kind: applying twice is impossible.
CREATE TABLE IF NOT EXISTS settlement (
    settlement_id   BIGINT NOT NULL AUTO_INCREMENT,
    payment_id      BIGINT UNSIGNED NOT NULL,
    merchant_id     VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    operation_id    BIGINT NOT NULL,
    kind            VARCHAR(12) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    settled_amount  BIGINT NOT NULL,
    currency        CHAR(3) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    event_id        CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL COMMENT 'the event that triggered it',
    settled_at      DATETIME(6) NOT NULL,
    PRIMARY KEY (settlement_id),
    UNIQUE KEY uq_settlement_operation (operation_id, kind),
    KEY ix_settlement_payment (payment_id),
    KEY ix_settlement_settled_at (settled_at),
    CONSTRAINT ck_settlement_kind CHECK (kind IN ('CAPTURE', 'ADJUSTMENT')),
    CONSTRAINT ck_settlement_sign CHECK ((kind = 'CAPTURE' AND settled_amount > 0)
                                        OR (kind = 'ADJUSTMENT' AND settled_amount < 0)),
    CONSTRAINT fk_settlement_payment FOREIGN KEY (payment_id) REFERENCES payment (payment_id)
        ON DELETE RESTRICT ON UPDATE RESTRICT,
    CONSTRAINT fk_settlement_operation FOREIGN KEY (operation_id) REFERENCES payment_operation (operation_id)
        ON DELETE RESTRICT ON UPDATE RESTRICT
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TRIGGER IF NOT EXISTS settlement_no_update BEFORE UPDATE ON settlement FOR EACH ROW
    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'settlement is append-only: add an adjustment instead';

CREATE TRIGGER IF NOT EXISTS settlement_no_delete BEFORE DELETE ON settlement FOR EACH ROW
    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'settlement is append-only: add an adjustment instead';

-- Dead letters: a message that could not be parsed or failed N times. `source` (topic:partition:offset) is unique
-- so a redelivered poison message is recorded once. While a payment has an OPEN dead letter, its later events are
-- parked (parked_event) instead of applied; `payapp dlq replay` re-processes them in sequence order.
CREATE TABLE IF NOT EXISTS dlq_event (
    dlq_id       BIGINT NOT NULL AUTO_INCREMENT,
    source       VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    event_id     CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NULL,
    payment_id   BIGINT UNSIGNED NULL,
    topic        VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    `sequence`   INT NULL,
    payload      LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    error        TEXT NOT NULL,
    attempts     INT NOT NULL,
    status       VARCHAR(10) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at   DATETIME(6) NOT NULL,
    resolved_at  DATETIME(6) NULL,
    PRIMARY KEY (dlq_id),
    UNIQUE KEY uq_dlq_source (source),
    KEY ix_dlq_payment (payment_id, status),
    KEY ix_dlq_event (event_id),
    CONSTRAINT ck_dlq_status CHECK (status IN ('OPEN', 'RESOLVED'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS parked_event (
    event_id     CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    payment_id   BIGINT UNSIGNED NOT NULL,
    topic        VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    `sequence`   INT NOT NULL,
    payload      LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    parked_at    DATETIME(6) NOT NULL,
    PRIMARY KEY (event_id),
    KEY ix_parked_payment (payment_id, `sequence`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS reconciliation_report (
    report_id               BIGINT NOT NULL AUTO_INCREMENT,
    report_date             DATE NOT NULL,
    time_zone               VARCHAR(64) NOT NULL,
    window_start            DATETIME(6) NOT NULL COMMENT 'UTC',
    window_end              DATETIME(6) NOT NULL COMMENT 'UTC; the settle-lag cutoff when the day is not over',
    total_debit             BIGINT NOT NULL,
    total_credit            BIGINT NOT NULL,
    is_balanced             BOOLEAN NOT NULL,
    payments_checked        INT NOT NULL,
    captures_checked        INT NOT NULL,
    settlements_checked     INT NOT NULL,
    unbalanced_payments     INT NOT NULL,
    missing_settlements     INT NOT NULL,
    settlement_mismatches   INT NOT NULL,
    mismatched_payment_ids  TEXT NOT NULL COMMENT 'comma-separated, at most 1000',
    trigger_kind            VARCHAR(10) CHARACTER SET ascii COLLATE ascii_bin NOT NULL COMMENT 'manual, schedule',
    created_at              DATETIME(6) NOT NULL,
    PRIMARY KEY (report_id),
    KEY ix_report_date (report_date, report_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

// deskpush wire protocol v1: every outcome, error code and close code.
// Generated from deskpush.protocol.vocabulary by `make vocabulary`; do not edit.

export const OUTCOME = Object.freeze({
  ACCEPTED: "Accept/Accept",
  AUTO_ACCEPTED: "Accept/AutoAccept",
  DECLINED: "Reject/DeclinedByAgent",
  QUEUE_LIMIT: "Reject/NotificationQueueLimitExceeded",
  QUEUE_TIME_LIMIT: "Reject/NotificationQueueTimeLimitExceeded",
  DISPLAY_TIMEOUT: "Timeout/DisplayTimeout",
  CANCELLED: "Cancel/CancelledByIntegrator",
  AGENT_DISCONNECTED: "Reject/AgentDisconnected",
});

export const AGENT_ERROR = Object.freeze({
  BAD_FRAME: "BadFrame",
  ALREADY_AUTHENTICATED: "AlreadyAuthenticated",
  UNKNOWN_NOTIFICATION: "UnknownNotification",
  NOTIFICATION_NOT_PENDING: "NotificationNotPending",
  NOTIFICATION_NOT_DISPLAYED: "NotificationNotDisplayed",
});

export const ERROR_MESSAGE = Object.freeze({
  TEMPLATE_NOT_FOUND: "NotificationTemplateNotFoundError",
  REJECT_AFTER_CLIENT: "RejectAfterClientError",
  TOKEN_IN_USE: "CancellationTokenInUseError",
  TOKEN_NOT_FOUND: "CancellationTokenNotFoundError",
  AGENT_NOT_CONNECTED: "AgentNotConnectedError",
  UNAUTHORIZED: "UnauthorizedError",
  OUTCOME_UNKNOWN: "OutcomeUnknownError",
});

export const MSDYN_NAME = Object.freeze({
  NOTIFY_EVENT: "NotifyEvent",
  CANCEL_EVENT: "CancelEvent",
  LIST_TEMPLATES: "ListTemplates",
});

export const CLOSE_CODE = Object.freeze({
  NORMAL_CLOSURE: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  ABNORMAL_CLOSURE: 1006,
  INVALID_DATA: 1007,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  UNAUTHORIZED: 4401,
  SESSION_REPLACED: 4409,
  AUTH_THROTTLED: 4429,
});

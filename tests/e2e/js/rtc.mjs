// MatrixRTC's delayed-event calls, made with matrix-js-sdk against a homeserver behind nginx.
//
// The calls are the ones a MatrixRTC membership manager makes in state-event ("compatibility")
// mode: feature detection through /versions, a delayed leave (`org.matrix.msc3401.call.member`
// with empty content) scheduled before the join, heartbeat restarts, cancel, send now, and the
// lookups. After each step the room's state is read back through the same vhost.
//
// Environment:
//   CLIENT_URL                  the public vhost (nginx), e.g. http://127.0.0.1:8080 (required)
//   MATRIX_USER_ID, MATRIX_ACCESS_TOKEN, MATRIX_DEVICE_ID
//                               an existing account to use; otherwise one is registered with
//   REGISTRATION_SHARED_SECRET  through Synapse's /_synapse/admin/v1/register (nonce + HMAC)
//   HOMESERVER_URL              optional: where to register if the vhost does not route
//                               /_synapse/admin (the homeserver's own listener)
//   RTC_DELAY_MS                delay of the scheduled leave (default 3000)
//   RTC_SLACK_MS                how late a delayed event may land (default 10000)
//
// Prints one line per check and `N passed, M failed` at the end; exits 1 on any failure.

import { createHmac, randomBytes } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";

import { createClient, MatrixError } from "matrix-js-sdk";

const MSC4140 = "org.matrix.msc4140";
const CALL_MEMBER = "org.matrix.msc3401.call.member";
const DELAY_MS = intFromEnv("RTC_DELAY_MS", 3000);
const SLACK_MS = intFromEnv("RTC_SLACK_MS", 10000);
// Clocks of the test and the server are the same machine's, but a request takes time both ways.
const EARLY_TOLERANCE_MS = 300;

let passed = 0;
let failed = 0;
let step = "";

/** Names the call about to be made, so that an unexpected error says which one failed. */
function during(label, promise) {
    step = label;
    return promise;
}

function intFromEnv(name, fallback) {
    const raw = process.env[name];
    if (raw === undefined || raw === "") return fallback;
    const value = Number.parseInt(raw, 10);
    if (!Number.isFinite(value) || value < 0) {
        throw new Error(`${name} must be a non-negative integer, got ${JSON.stringify(raw)}`);
    }
    return value;
}

class CheckFailed extends Error {}

function check(name, condition, detail = "") {
    if (condition) {
        passed += 1;
        console.log(`ok     ${name}`);
        return;
    }
    failed += 1;
    console.log(`FAILED ${name}${detail ? `: ${detail}` : ""}`);
    throw new CheckFailed(name);
}

function describe(value) {
    return JSON.stringify(value);
}

function errorText(err) {
    if (err instanceof MatrixError) {
        return `HTTP ${err.httpStatus} ${err.errcode ?? ""} ${err.data?.error ?? err.message}`.trim();
    }
    if (err instanceof Error) {
        const cause = err.cause ? ` (${err.cause.message ?? err.cause})` : "";
        return process.env.RTC_DEBUG ? `${err.stack}${cause}` : `${err.message}${cause}`;
    }
    return String(err);
}

/** Runs one scenario; a failed check or an unexpected error ends that scenario only. */
async function scenario(title, body) {
    console.log(`# ${title}`);
    step = "";
    try {
        await body();
    } catch (err) {
        if (err instanceof CheckFailed) return;
        failed += 1;
        const where = step ? ` in ${step}` : "";
        console.log(`FAILED ${title}: unexpected error${where}: ${errorText(err)}`);
    }
}

async function expectMatrixError(promise, errcode) {
    try {
        const answer = await promise;
        return `succeeded with ${describe(answer)}`;
    } catch (err) {
        if (err instanceof MatrixError && err.errcode === errcode) return null;
        return errorText(err);
    }
}

// --- accounts ---------------------------------------------------------------------------------

async function registerWithSharedSecret(baseUrl, secret, username, password) {
    const url = `${baseUrl.replace(/\/+$/, "")}/_synapse/admin/v1/register`;
    const nonceResponse = await fetch(url).catch((err) => {
        throw new Error(`cannot reach ${url}: ${err.cause?.message ?? err.message}`);
    });
    if (!nonceResponse.ok) {
        throw new Error(`GET ${url} answered ${nonceResponse.status}`);
    }
    const { nonce } = await nonceResponse.json();
    const mac = createHmac("sha1", secret)
        .update(`${nonce}\0${username}\0${password}\0notadmin`)
        .digest("hex");
    const response = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ nonce, username, password, admin: false, mac }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok || !body.user_id || !body.access_token || !body.device_id) {
        throw new Error(`registering ${username} at ${url} answered ${response.status} ${describe(body)}`);
    }
    return { userId: body.user_id, accessToken: body.access_token, deviceId: body.device_id };
}

async function account(clientUrl) {
    const { MATRIX_USER_ID, MATRIX_ACCESS_TOKEN, MATRIX_DEVICE_ID } = process.env;
    if (MATRIX_USER_ID && MATRIX_ACCESS_TOKEN && MATRIX_DEVICE_ID) {
        return { userId: MATRIX_USER_ID, accessToken: MATRIX_ACCESS_TOKEN, deviceId: MATRIX_DEVICE_ID };
    }
    const secret = process.env.REGISTRATION_SHARED_SECRET;
    if (!secret) {
        throw new Error(
            "set MATRIX_USER_ID, MATRIX_ACCESS_TOKEN and MATRIX_DEVICE_ID, or REGISTRATION_SHARED_SECRET",
        );
    }
    const username = `rtc_${randomBytes(6).toString("hex")}`;
    const password = randomBytes(18).toString("base64url");
    const targets = [clientUrl, process.env.HOMESERVER_URL].filter(Boolean);
    let lastError;
    for (const target of targets) {
        try {
            return await registerWithSharedSecret(target, secret, username, password);
        } catch (err) {
            lastError = err;
        }
    }
    throw lastError;
}

// --- room state -------------------------------------------------------------------------------

/** The call-member state event for `stateKey`, or null when the room has none. */
async function memberEvent(client, roomId, stateKey) {
    const events = await client.roomState(roomId);
    return events.find((e) => e.type === CALL_MEMBER && e.state_key === stateKey) ?? null;
}

function isLeave(event) {
    return event !== null && Object.keys(event.content ?? {}).length === 0;
}

function isJoin(event) {
    return event !== null && Object.keys(event.content ?? {}).length > 0;
}

/** Polls the room until the leave is in its state or the deadline passes; returns it or null. */
async function waitForLeave(client, roomId, stateKey, deadline) {
    for (;;) {
        const event = await during("roomState", memberEvent(client, roomId, stateKey));
        if (isLeave(event)) return event;
        if (Date.now() >= deadline) return null;
        await sleep(200);
    }
}

function joinContent(deviceId) {
    // What a MatrixRTC participant publishes while in a call (abridged).
    return {
        application: "m.call",
        call_id: "",
        scope: "m.room",
        device_id: deviceId,
        expires: 14400000,
        focus_active: { type: "livekit", focus_selection: "oldest_membership" },
        foci_preferred: [],
    };
}

// --- the calls --------------------------------------------------------------------------------

async function main() {
    const clientUrl = process.env.CLIENT_URL;
    if (!clientUrl) throw new Error("CLIENT_URL is required (the nginx vhost, e.g. http://127.0.0.1:8080)");

    const creds = await account(clientUrl);
    const quiet = { trace() {}, debug() {}, info() {}, warn() {}, error() {} };
    quiet.getChild = () => quiet;
    const client = createClient({
        baseUrl: clientUrl,
        userId: creds.userId,
        accessToken: creds.accessToken,
        deviceId: creds.deviceId,
        logger: quiet,
    });
    const stateKey = `_${creds.userId}_${creds.deviceId}_m.call`;
    console.log(`# ${clientUrl} as ${creds.userId} (${creds.deviceId}), state key ${stateKey}`);

    const newRoom = async (name) => (await client.createRoom({ name, preset: "private_chat" })).room_id;
    const schedule = (roomId, delay) =>
        client._unstable_sendDelayedStateEvent(roomId, { delay }, CALL_MEMBER, {}, stateKey);
    const join = (roomId) => client.sendStateEvent(roomId, CALL_MEMBER, joinContent(creds.deviceId), stateKey);

    await scenario("feature detection", async () => {
        const supported = await during("doesServerSupportUnstableFeature", client.doesServerSupportUnstableFeature(MSC4140));
        check(`/versions advertises ${MSC4140}`, supported === true, `got ${describe(supported)}`);
    });

    await scenario("delayed leave fires after its delay", async () => {
        const roomId = await during("createRoom", newRoom("rtc timeout"));
        const t0 = Date.now();
        const { delay_id: delayId } = await during("_unstable_sendDelayedStateEvent", schedule(roomId, DELAY_MS));
        check("schedule answers a delay_id", typeof delayId === "string" && delayId.length >= 16, describe(delayId));
        check("nothing in the room state right after scheduling", (await during("roomState", memberEvent(client, roomId, stateKey))) === null);
        await during("sendStateEvent (join)", join(roomId));
        check("own join after scheduling is in the state", isJoin(await during("roomState", memberEvent(client, roomId, stateKey))));

        const one = await during("_unstable_getDelayedEvent", client._unstable_getDelayedEvent(delayId));
        check(
            "getDelayedEvent describes the scheduled leave",
            one.delay_id === delayId &&
                one.room_id === roomId &&
                one.type === CALL_MEMBER &&
                one.state_key === stateKey &&
                one.delay_ms === DELAY_MS &&
                describe(one.content) === "{}" &&
                !one.finalised,
            describe(one),
        );
        const list = await during("_unstable_getDelayedEvents", client._unstable_getDelayedEvents());
        check(
            "getDelayedEvents lists it as scheduled",
            Array.isArray(list.scheduled) && list.scheduled.some((e) => e.delay_id === delayId),
            describe(list),
        );

        const leave = await during("roomState", waitForLeave(client, roomId, stateKey, t0 + DELAY_MS + SLACK_MS));
        const landed = Date.now();
        check(`leave lands within ${DELAY_MS} ms + ${SLACK_MS} ms`, leave !== null);
        check(
            "leave does not land before its delay",
            landed - t0 >= DELAY_MS - EARLY_TOLERANCE_MS,
            `landed after ${landed - t0} ms`,
        );
        check("leave is sent as the scheduling user", leave.sender === creds.userId, describe(leave));

        const done = await during("_unstable_getDelayedEvent", client._unstable_getDelayedEvent(delayId));
        check(
            "getDelayedEvent shows it finalised with the sent event id",
            done.finalised?.event_id === leave.event_id && !done.finalised?.error,
            describe(done),
        );
        const finalised = await during("_unstable_getDelayedEvents(finalised)", client._unstable_getDelayedEvents("finalised", [delayId]));
        const item = finalised.finalised?.find((e) => e.delayed_event?.delay_id === delayId);
        check(
            "getDelayedEvents(finalised) reports outcome send, reason delay",
            item?.outcome === "send" && item?.reason === "delay" && item?.event_id === leave.event_id,
            describe(finalised),
        );
        check(
            "restart after it fired answers M_NOT_FOUND",
            (await expectMatrixError(client._unstable_restartScheduledDelayedEvent(delayId), "M_NOT_FOUND")) === null,
        );
    });

    await scenario("restart keeps the leave away past its original time", async () => {
        const roomId = await during("createRoom", newRoom("rtc restart"));
        const delay = DELAY_MS + 1000;
        const t0 = Date.now();
        const { delay_id: delayId } = await during("_unstable_sendDelayedStateEvent", schedule(roomId, delay));
        await during("sendStateEvent (join)", join(roomId));
        await sleep(Math.floor(delay / 2));
        const restartedAt = Date.now();
        const answer = await during("_unstable_restartScheduledDelayedEvent", client._unstable_restartScheduledDelayedEvent(delayId));
        check("restart answers {}", describe(answer) === "{}", describe(answer));
        const afterOriginal = t0 + delay + 1000;
        await sleep(Math.max(0, afterOriginal - Date.now()));
        const event = await during("roomState", memberEvent(client, roomId, stateKey));
        check("1 s past the original send time the join is still there", isJoin(event), describe(event));
        const leave = await during("roomState", waitForLeave(client, roomId, stateKey, restartedAt + delay + SLACK_MS));
        const landed = Date.now();
        check("leave lands after the restarted delay", leave !== null);
        check(
            "leave lands no earlier than restart + delay",
            landed - restartedAt >= delay - EARLY_TOLERANCE_MS,
            `landed ${landed - restartedAt} ms after the restart`,
        );
    });

    await scenario("cancel: the leave never lands", async () => {
        const roomId = await during("createRoom", newRoom("rtc cancel"));
        const { delay_id: delayId } = await during("_unstable_sendDelayedStateEvent", schedule(roomId, DELAY_MS));
        await during("sendStateEvent (join)", join(roomId));
        const answer = await during("_unstable_cancelScheduledDelayedEvent", client._unstable_cancelScheduledDelayedEvent(delayId));
        check("cancel answers {}", describe(answer) === "{}", describe(answer));
        const list = await during("_unstable_getDelayedEvents(scheduled)", client._unstable_getDelayedEvents("scheduled"));
        check(
            "cancelled event is gone from the scheduled list",
            Array.isArray(list.scheduled) && !list.scheduled.some((e) => e.delay_id === delayId),
            describe(list),
        );
        await sleep(DELAY_MS + 1500);
        const event = await during("roomState", memberEvent(client, roomId, stateKey));
        check("past its send time the join is still there", isJoin(event), describe(event));
        const done = await during("_unstable_getDelayedEvent", client._unstable_getDelayedEvent(delayId));
        check(
            "getDelayedEvent shows it finalised without an event",
            done.finalised !== undefined && done.finalised !== null && !done.finalised.event_id,
            describe(done),
        );
        const finalised = await during("_unstable_getDelayedEvents(finalised)", client._unstable_getDelayedEvents("finalised", [delayId]));
        const item = finalised.finalised?.find((e) => e.delayed_event?.delay_id === delayId);
        check(
            "getDelayedEvents(finalised) reports outcome cancel, reason action",
            item?.outcome === "cancel" && item?.reason === "action",
            describe(finalised),
        );
        for (const [name, call] of [
            ["restart", () => client._unstable_restartScheduledDelayedEvent(delayId)],
            ["send", () => client._unstable_sendScheduledDelayedEvent(delayId)],
            ["cancel", () => client._unstable_cancelScheduledDelayedEvent(delayId)],
        ]) {
            const problem = await expectMatrixError(call(), "M_NOT_FOUND");
            check(`${name} on the cancelled event answers M_NOT_FOUND`, problem === null, problem ?? "");
        }
    });

    await scenario("send now: the leave lands at once", async () => {
        const roomId = await during("createRoom", newRoom("rtc send"));
        const { delay_id: delayId } = await during("_unstable_sendDelayedStateEvent", schedule(roomId, 600000));
        await during("sendStateEvent (join)", join(roomId));
        const sentAt = Date.now();
        const answer = await during("_unstable_sendScheduledDelayedEvent", client._unstable_sendScheduledDelayedEvent(delayId));
        check("send answers {}", describe(answer) === "{}", describe(answer));
        const leave = await during("roomState", waitForLeave(client, roomId, stateKey, sentAt + 3000));
        check("leave is in the state within 3 s of send", leave !== null);
        const done = await during("_unstable_getDelayedEvent", client._unstable_getDelayedEvent(delayId));
        check(
            "getDelayedEvent shows the sent event id",
            done.finalised?.event_id === leave.event_id,
            describe(done),
        );
        const finalised = await during("_unstable_getDelayedEvents(finalised)", client._unstable_getDelayedEvents("finalised", [delayId]));
        const item = finalised.finalised?.find((e) => e.delayed_event?.delay_id === delayId);
        check(
            "getDelayedEvents(finalised) reports outcome send, reason action",
            item?.outcome === "send" && item?.reason === "action",
            describe(finalised),
        );
    });

    await scenario("unknown delay id", async () => {
        const problem = await expectMatrixError(
            client._unstable_restartScheduledDelayedEvent("no-such-delay-id"),
            "M_NOT_FOUND",
        );
        check("restart of an unknown id answers M_NOT_FOUND", problem === null, problem ?? "");
    });
}

try {
    await main();
} catch (err) {
    failed += 1;
    console.log(`FAILED setup: ${errorText(err)}`);
}
console.log(`${passed} passed, ${failed} failed`);
process.exitCode = failed === 0 && passed > 0 ? 0 : 1;

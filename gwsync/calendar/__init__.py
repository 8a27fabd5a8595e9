"""The calendar side: iCalendar mapping, the two-way decisions, the CalDAV adapter and the sync."""
